"""InstructPix2Pix: edit an image by a written instruction.

Brooks, Holynski & Efros, "InstructPix2Pix: Learning to Follow Image Editing Instructions"
(CVPR 2023). The UNet takes 8 input channels: the noisy latent z_t and the input image's
latent E(c_I). Classifier-free guidance has two scales (§3.2.1, eq. 3):

    ẽ_θ(z_t, c_I, c_T) = e_θ(z_t, ∅, ∅)
                       + s_I · (e_θ(z_t, c_I, ∅) − e_θ(z_t, ∅, ∅))
                       + s_T · (e_θ(z_t, c_I, c_T) − e_θ(z_t, c_I, ∅))

The three branches run as ONE batched denoiser forward per step: diffusers'
`StableDiffusionInstructPix2PixPipeline` stacks [(c_I, c_T), (c_I, ∅), (∅, ∅)] on the batch
axis and combines them exactly so. That pipeline turns guidance off altogether when
s_T ≤ 1 (or s_I < 1), where eq. 3 would still apply s_I; such pairs are refused rather than
quietly ignored, except s_T = s_I = 1, which is plain conditional sampling.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from .images import FIT_MODES, fit_to_grid
from .models import ModelManager
from .progress import StepInfo, step_callback
from .result import Result
from .schedulers import check_scheduler, make_scheduler
from .settings import Settings, SettingsError, check_float, check_int, check_prompt
from .txt2img import MAX_SEED, model_defaults, sampling_defaults

DEFAULT_IMAGE_GUIDANCE = 1.5


@dataclass(frozen=True)
class InstructPix2PixSettings(Settings):
    technique = "ip2p"
    schema_version = 1

    instruction: str = ""
    model: str = "toy-instruct-pix2pix"
    negative_prompt: str = ""
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None  # s_T, text guidance
    image_guidance: float | None = None  # s_I, image guidance
    scheduler: str | None = None
    batch_size: int = 1
    fit: str = "crop"
    width: int | None = None  # the fitted input's size, filled in by `run`
    height: int | None = None
    source_id: int | None = None  # the gallery item that was edited (the result's parent)

    def __post_init__(self):
        check_prompt("instruction", self.instruction, required=True)
        check_prompt("negative prompt", self.negative_prompt, required=False)
        check_int("seed", self.seed, 0, MAX_SEED)
        check_int("steps", self.steps, 1, 150)
        check_float("text guidance", self.guidance, 0.0, 30.0)
        check_float("image guidance", self.image_guidance, 0.0, 10.0)
        check_int("batch size", self.batch_size, 1, 8)
        check_int("source id", self.source_id, 1, 2**63 - 1)
        check_int("width", self.width, 8, 4096)
        check_int("height", self.height, 8, 4096)
        if self.fit not in FIT_MODES:
            raise SettingsError(f"fit must be one of {', '.join(FIT_MODES)}, not {self.fit!r}")
        if not isinstance(self.model, str) or not self.model.strip():
            raise SettingsError("no model given")
        if self.guidance is not None and self.image_guidance is not None:
            check_guidance_pair(self.guidance, self.image_guidance)

    @property
    def prompt(self) -> str:
        """The instruction is what the gallery searches and A1111's infotext calls the prompt."""
        return self.instruction


def check_guidance_pair(text: float, image: float) -> None:
    if text == 1.0 and image == 1.0:
        return
    if text <= 1.0:
        raise SettingsError(
            f"text guidance {text:g} turns guidance off, so image guidance {image:g} would do nothing: "
            "set text guidance above 1, or both to 1"
        )
    if image < 1.0:
        raise SettingsError(f"image guidance must be at least 1 while text guidance is on, not {image:g}")


def resolve(
    settings: InstructPix2PixSettings, models: ModelManager, size: tuple[int, int]
) -> tuple[InstructPix2PixSettings, str]:
    spec = models.resolve(settings.model)
    s = settings.replace(
        **sampling_defaults(settings, model_defaults(spec)),
        image_guidance=(
            settings.image_guidance
            if settings.image_guidance is not None
            else spec.defaults.get("image_guidance", DEFAULT_IMAGE_GUIDANCE)
        ),
        width=size[0],
        height=size[1],
    )
    check_guidance_pair(s.guidance, s.image_guidance)
    if spec.family not in ("sd", "unknown"):
        raise SettingsError(f"{spec.name} is a {spec.family} model; InstructPix2Pix models are SD 1.x")
    check_scheduler(s.scheduler, "sd")
    return s, "sd"


def run(
    settings: InstructPix2PixSettings,
    image,
    models: ModelManager,
    *,
    on_step: Callable[[StepInfo], None] | None = None,
) -> Result:
    """Apply `settings.instruction` to `image` (a PIL image); batch_size images, seeds seed + i."""
    import torch

    # 1. Fit the input to the latent grid and fill unset settings from the model's defaults.
    fitted = fit_to_grid(image, settings.fit)
    s, family = resolve(settings, models, fitted.image.size)
    started = time.perf_counter()
    result = Result(settings=s, family=family, notes=[f"input {fitted.note}"])
    # 2. The model must be an InstructPix2Pix one (8 input channels): lend() checks.
    with models.lend(s.model, "ip2p") as pipe:
        pipe.scheduler = make_scheduler(s.scheduler, family, pipe.scheduler.config)
        seeds = [s.seed + i for i in range(s.batch_size)]
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]

        # 3. Sample with eq. 3's two guidance scales (one batched forward of three branches a step).
        # One (instruction, image) pair per output: the pipeline wants as many images as prompts.
        output = pipe(
            prompt=[s.instruction] * s.batch_size,
            negative_prompt=[s.negative_prompt] * s.batch_size if s.negative_prompt else None,
            image=[fitted.image] * s.batch_size,
            num_inference_steps=s.steps,
            guidance_scale=s.guidance,
            image_guidance_scale=s.image_guidance,
            generator=generators,
            callback_on_step_end=step_callback(on_step, s.steps),
        )
        result.images, result.seeds = list(output.images), seeds
    result.duration_s = time.perf_counter() - started
    return result
