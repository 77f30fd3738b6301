"""Text-to-image for the SD 1.x, SDXL, SD3 and FLUX families.

Sampling follows each family's diffusers pipeline unchanged, so an image made here is
bit-identical to one made by calling the bare pipeline with the same model, sampler,
seed and settings. Classifier-free guidance (Ho & Salimans, "Classifier-Free Diffusion
Guidance", 2022, eq. 6: ε̃ = ε_∅ + w (ε_c - ε_∅)) runs as ONE batched denoiser forward
per step over [unconditional, conditional]; at w <= 1, and for guidance-distilled models
(SDXL-Turbo, FLUX), a single branch runs. SDXL's size/crop micro-conditioning (Podell et
al., "SDXL", 2023, §2.2) and base-to-refiner hand-off, and SD3/FLUX's flow-matching
shift (Esser et al., "Scaling Rectified Flow Transformers", 2024, §5.3.2) are settings.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from .models import FLOW_FAMILIES, LoraRef, ModelManager, family_of_pipe
from .progress import StepInfo, step_callback
from .result import Result
from .schedulers import check_scheduler, make_scheduler
from .settings import Settings, SettingsError, check_float, check_int, check_prompt, check_size

MAX_SEED = 2**32 - 1
WEIGHTING_SYNTAX = re.compile(r"\([^()]*:\s*[\d.]+\s*\)|\w[+-]+(\s|$|,)|\)[+-]+|\.(and|blend)\(")


@dataclass(frozen=True)
class Txt2ImgSettings(Settings):
    technique = "txt2img"
    schema_version = 1

    prompt: str = ""
    model: str = "toy-sd"
    negative_prompt: str = ""
    seed: int | None = None  # None: a random seed is drawn and recorded
    steps: int | None = None  # None: the model's default
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None
    batch_size: int = 1
    batch_count: int = 1
    loras: tuple[LoraRef, ...] = ()
    shift: float | None = None  # SD3 / FLUX flow-matching shift
    original_size: tuple[int, int] | None = None  # SDXL micro-conditioning
    crop_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    refiner: str | None = None  # SDXL: a refiner model takes over the last steps
    refiner_fraction: float = 0.8  # share of the steps the base model does

    def __post_init__(self):
        check_prompt("prompt", self.prompt, required=True)
        check_prompt("negative prompt", self.negative_prompt, required=False)
        check_int("seed", self.seed, 0, MAX_SEED)
        check_int("steps", self.steps, 1, 150)
        check_float("guidance", self.guidance, 0.0, 30.0)
        check_size("width", self.width)
        check_size("height", self.height)
        check_int("batch size", self.batch_size, 1, 8)
        check_int("batch count", self.batch_count, 1, 16)
        check_float("shift", self.shift, 0.1, 20.0)
        check_float("refiner fraction", self.refiner_fraction, 0.0, 1.0)
        if not isinstance(self.model, str) or not self.model.strip():
            raise SettingsError("no model given")
        for lora in self.loras:
            if not isinstance(lora, LoraRef):
                raise SettingsError("loras must be a list of {source, weight}")
            check_float(f"weight of LoRA {lora.source}", lora.weight, -4.0, 4.0)
        for name in ("original_size", "target_size", "crop_top_left"):
            value = getattr(self, name)
            for v in value or ():
                check_int(name.replace("_", " "), v, 0, 16384)


def model_defaults(spec) -> dict:
    """A model's sampling defaults: its catalog entry's, else the family's usual ones.

    width/height are None when the catalog doesn't say: the denoiser's native size applies.
    """
    d = spec.defaults
    return {
        "steps": d.get("steps", 25),
        "guidance": d.get("guidance", 7.0),
        "width": d.get("width"),
        "height": d.get("height"),
        "scheduler": d.get("scheduler", "Flow Euler" if spec.family in FLOW_FAMILIES else "DDIM"),
    }


def resolve(settings: Txt2ImgSettings, models: ModelManager) -> tuple[Txt2ImgSettings, str]:
    """Fill every unset value from the model's defaults and draw a seed if none was given."""
    spec = models.resolve(settings.model)
    d = model_defaults(spec)
    family = spec.family
    resolved = settings.replace(
        **sampling_defaults(settings, d),
        width=settings.width or d["width"],
        height=settings.height or d["height"],
    )
    if family != "unknown":
        check_scheduler(resolved.scheduler, family)
        check_family_options(resolved, family)
    return resolved, family


def sampling_defaults(settings, defaults: dict) -> dict:
    """Seed (drawn if unset), steps, guidance and sampler: the given ones, else the model's."""
    return {
        "seed": draw_seed(settings.seed),
        "steps": settings.steps or defaults["steps"],
        "guidance": settings.guidance if settings.guidance is not None else defaults["guidance"],
        "scheduler": settings.scheduler or defaults["scheduler"],
    }


def draw_seed(seed: int | None) -> int:
    """The given seed, or a fresh random one (recorded with the image, so it can be remade)."""
    return seed if seed is not None else random.SystemRandom().randint(0, MAX_SEED)


def check_family_options(s: Txt2ImgSettings, family: str) -> None:
    if s.shift is not None and family not in FLOW_FAMILIES:
        raise SettingsError(f"shift applies to flow-matching models (SD3, FLUX), not {family}")
    sdxl_only = s.original_size or s.target_size or s.crop_top_left != (0, 0) or s.refiner
    if sdxl_only and family != "sdxl":
        raise SettingsError(f"size/crop conditioning and the refiner apply to SDXL models, not {family}")
    if family == "flux" and s.negative_prompt:
        raise SettingsError("FLUX models are guidance-distilled and take no negative prompt")


def run(
    settings: Txt2ImgSettings, models: ModelManager, *, on_step: Callable[[StepInfo], None] | None = None
) -> Result:
    """Generate `batch_count` batches of `batch_size` images; image i uses seed + i."""
    import torch

    # 1. Resolve the model and fill unset settings from its defaults.
    s, family = resolve(settings, models)
    started = time.perf_counter()
    embeddings = models.embeddings_for(s.prompt, s.negative_prompt)
    with models.lend(s.model, "txt2img", loras=s.loras, embeddings=embeddings) as pipe:
        # Models outside the catalog default to the size their denoiser was trained at.
        native = native_size(pipe)
        s = s.replace(width=s.width or native, height=s.height or native)
        result = Result(settings=s)
        family = result.family = family if family != "unknown" else family_of_pipe(pipe)
        # 2. The sampler, built from the model's own scheduler config.
        pipe.scheduler = make_scheduler(s.scheduler, family, pipe.scheduler.config, shift=s.shift)
        # 3. Prompt embeddings: compel's weighting syntax for the SD families, else plain text.
        prompt_kwargs = prompt_arguments(pipe, family, s)
        # 4. Family-specific call arguments.
        call_kwargs = family_arguments(family, s)
        for batch in range(s.batch_count):
            # 5. One generator per image, seeded seed + index, on the CPU (reproducible anywhere).
            seeds = [s.seed + batch * s.batch_size + i for i in range(s.batch_size)]
            generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]

            # 6. Sample and decode.
            output = pipe(
                **prompt_kwargs,
                num_inference_steps=s.steps,
                guidance_scale=s.guidance,
                width=s.width,
                height=s.height,
                num_images_per_prompt=s.batch_size,
                generator=generators,
                callback_on_step_end=step_callback(on_step, s.steps, batch, s.batch_count),
                **call_kwargs,
            )
            images = output.images
            # 7. SDXL refiner: the base stopped at `refiner_fraction`; the refiner finishes.
            if s.refiner:
                images = _refine(models, s, images, prompt_kwargs, generators)
            result.images += list(images)
            result.seeds += seeds
    result.duration_s = time.perf_counter() - started
    return result


def native_size(pipe) -> int:
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    sample = getattr(pipe, "default_sample_size", None) or denoiser.config.sample_size
    return int(sample * pipe.vae_scale_factor)


def prompt_arguments(pipe, family: str, s: Txt2ImgSettings) -> dict:
    if family in ("sd", "sdxl") and (
        WEIGHTING_SYNTAX.search(s.prompt) or WEIGHTING_SYNTAX.search(s.negative_prompt)
    ):
        return _compel_embeddings(pipe, family, s)
    kwargs = {"prompt": s.prompt}
    if s.negative_prompt:
        kwargs["negative_prompt"] = s.negative_prompt
    return kwargs


def _compel_embeddings(pipe, family: str, s: Txt2ImgSettings) -> dict:
    """Prompt weighting, `(word:1.3)` / `word++` / `.blend()` (compel's syntax), as embeddings."""
    from compel import Compel, ReturnedEmbeddingsType

    if family == "sd":
        compel = Compel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, truncate_long_prompts=False)
        cond, uncond = compel([s.prompt, s.negative_prompt])
        return {"prompt_embeds": cond[None], "negative_prompt_embeds": uncond[None]}
    compel = Compel(
        tokenizer=[pipe.tokenizer, pipe.tokenizer_2],
        text_encoder=[pipe.text_encoder, pipe.text_encoder_2],
        returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
        requires_pooled=[False, True],
    )
    cond, pooled = compel([s.prompt, s.negative_prompt])
    return {
        "prompt_embeds": cond[:1],
        "pooled_prompt_embeds": pooled[:1],
        "negative_prompt_embeds": cond[1:],
        "negative_pooled_prompt_embeds": pooled[1:],
    }


def family_arguments(family: str, s: Txt2ImgSettings) -> dict:
    kwargs: dict = {}
    if family == "sdxl":
        if s.original_size:
            kwargs["original_size"] = s.original_size
        if s.target_size:
            kwargs["target_size"] = s.target_size
        kwargs["crops_coords_top_left"] = s.crop_top_left
        if s.refiner:
            kwargs["denoising_end"] = s.refiner_fraction
            kwargs["output_type"] = "latent"
    return kwargs


def _refine(models: ModelManager, s: Txt2ImgSettings, latents, prompt_kwargs: dict, generators) -> list:
    with models.lend(s.refiner, "img2img") as refiner:
        refiner.scheduler = make_scheduler(s.scheduler, "sdxl", refiner.scheduler.config)
        return refiner(
            **{k: v for k, v in prompt_kwargs.items() if k in ("prompt", "negative_prompt")},
            image=latents,
            num_inference_steps=s.steps,
            denoising_start=s.refiner_fraction,
            guidance_scale=s.guidance,
            generator=generators,
        ).images
