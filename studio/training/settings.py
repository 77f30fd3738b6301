"""The settings of one training run: method, data, optimisation, outputs."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from ..settings import Settings, SettingsError, check_float, check_int, check_prompt, check_size

METHODS = ("lora", "dreambooth", "textual-inversion")
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LR_SCHEDULES = ("constant", "cosine", "linear")
PRECISIONS = ("no", "fp16", "bf16")
CROPS = ("center", "random")
PRIOR_TARGETS = ("base-model", "class-pictures")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
TOKEN = re.compile(r"^<?[A-Za-z0-9_-]{1,32}>?$")
TARGET = re.compile(r"^[A-Za-z0-9_.]{1,64}$")


CLASS_PROMPT_CHARS = 16_000  # the gallery's limit on a stored text; each line is one prompt
COUNTS = (
    "class_images",
    "steps",
    "batch_size",
    "gradient_accumulation",
    "warmup_steps",
    "rank",
    "seed",
    "checkpoint_every",
    "sample_every",
)


def _with_version_1_prior_target(data: dict) -> dict:
    """Version 1 had no prior target: its prior term regressed to the noise (class-pictures)."""
    return {**data, "prior_target": "class-pictures"}


@dataclass(frozen=True)
class TrainingSettings(Settings):
    """One personalization run (Hu et al. 2022; Ruiz et al. 2023; Gal et al. 2023).

    `lora` trains low-rank adapters (with `prior_preservation` it is LoRA-DreamBooth),
    `dreambooth` the whole UNet, `textual-inversion` one new token embedding."""

    technique: ClassVar[str] = "train"
    schema_version: ClassVar[int] = 2
    upgraders: ClassVar[dict] = {1: _with_version_1_prior_target}

    method: str = "lora"
    model: str = "toy-sd"
    images: str = ""  # a folder of instance pictures (captions: same-name .txt files, else the prompt)
    instance_prompt: str = "a sks shape"
    class_prompt: str = ""  # prior preservation's class ("a shape"); one per line: a regularisation set
    prior_preservation: bool = False
    prior_weight: float = 1.0  # λ of Ruiz et al.'s eq. 2
    # what the class term regresses to: the frozen base model's own prediction at the noisy
    # class latent (measured to drift less), or the noise that made it (Ruiz et al.'s eq. 2)
    prior_target: str = "base-model"
    class_images: int = 50  # generated once by the base model, then cached
    steps: int = 1000
    learning_rate: float = 1e-4
    batch_size: int = 1
    gradient_accumulation: int = 1
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    rank: int = 4
    alpha: float = 4.0
    targets: tuple[str, ...] = ATTENTION_TARGETS
    train_text_encoder: bool = False
    token: str = "<sks>"  # textual inversion: the new word
    initializer: str = "shape"  # textual inversion: the word whose embedding it starts from
    resolution: int | None = None  # None: the model's native size
    crop: str = "center"
    flip: bool = False
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    seed: int = 0
    checkpoint_every: int = 250
    sample_every: int = 250
    sample_prompt: str = ""  # default: the instance prompt (textual inversion: with its token)
    name: str = ""  # the output's name; default: method and model

    def __post_init__(self):
        for count in COUNTS:
            if getattr(self, count) is None:  # check_int lets None through; these have no default to fall to
                raise SettingsError(f"{count.replace('_', ' ')} must be a whole number, not empty")
        if self.method not in METHODS:
            raise SettingsError(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if not isinstance(self.model, str) or not self.model.strip():
            raise SettingsError("no model given to train on")
        if not isinstance(self.images, str) or not self.images.strip():
            raise SettingsError("no training images given: a folder of pictures")
        check_prompt("instance prompt", self.instance_prompt, required=True)
        check_prompt(  # a regularisation set: a prompt a line
            "class prompt", self.class_prompt, required=self.prior_preservation, limit=CLASS_PROMPT_CHARS
        )
        check_prompt("sample prompt", self.sample_prompt, required=False)
        if self.prior_preservation and self.method == "textual-inversion":
            raise SettingsError("prior preservation is for LoRA and DreamBooth, not textual inversion")
        check_float("prior weight", self.prior_weight, 0.0, 10.0)
        _one_of("prior target", self.prior_target, PRIOR_TARGETS)
        check_int("class images", self.class_images, 1, 1000)
        if self.prior_preservation and len(self.class_prompts) > self.class_images:
            raise SettingsError(
                f"{len(self.class_prompts)} class prompts but {self.class_images} class pictures: "
                "each prompt needs at least one picture"
            )
        check_int("steps", self.steps, 1, 100_000)
        check_float("learning rate", self.learning_rate, 1e-8, 1.0)
        check_int("batch size", self.batch_size, 1, 64)
        check_int("gradient accumulation", self.gradient_accumulation, 1, 64)
        _one_of("lr schedule", self.lr_schedule, LR_SCHEDULES)
        check_int("warm-up steps", self.warmup_steps, 0, self.steps)
        check_int("rank", self.rank, 1, 256)
        check_float("alpha", self.alpha, 0.01, 1024.0)
        if not self.targets or not all(isinstance(t, str) and TARGET.match(t) for t in self.targets):
            raise SettingsError("targets must be module names like to_q, to_k, to_v, to_out.0")
        if self.method == "textual-inversion":
            if not TOKEN.match(self.token or ""):
                raise SettingsError(f"the token must be one word like <sks>, not {self.token!r}")
            if self.token not in self.instance_prompt:
                raise SettingsError(f"the instance prompt must contain the token {self.token}")
            check_prompt("initializer word", self.initializer, required=True)
        check_size("resolution", self.resolution, 8, 2048)
        _one_of("crop", self.crop, CROPS)
        _one_of("mixed precision", self.mixed_precision, PRECISIONS)
        check_int("seed", self.seed, 0, 2**32 - 1)
        check_int("checkpoint every", self.checkpoint_every, 1, 100_000)
        check_int("sample every", self.sample_every, 1, 100_000)
        if self.name and not NAME.match(self.name):
            raise SettingsError("the name may use letters, digits, '.', '_' and '-' (up to 64)")

    @property
    def class_prompts(self) -> tuple[str, ...]:
        """The class prompt's lines: one is Ruiz et al.'s class ("a shape"); several make a
        regularisation set (kohya's "reg images") whose pictures cycle through them."""
        return tuple(line.strip() for line in self.class_prompt.splitlines() if line.strip())

    @property
    def output_name(self) -> str:
        if self.name:
            return self.name
        model = re.sub(r"[^A-Za-z0-9._-]+", "-", self.model.strip().rstrip("/").split("/")[-1])[:40]
        return f"{self.method}-{model or 'model'}"


def _one_of(label: str, value, options) -> None:
    if value not in options:
        raise SettingsError(f"{label} must be one of {', '.join(options)}, not {value!r}")
