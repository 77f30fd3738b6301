"""SDEdit: edit an image by a prompt, by noising it part-way and denoising it back.

Meng et al., "SDEdit: Guided Image Synthesis and Editing with Stochastic Differential
Equations" (ICLR 2022), §3 / Algorithm 1: perturb the input x_0 to time t_0 = strength · T,
x_{t_0} = √ᾱ_{t_0} x_0 + √(1-ᾱ_{t_0}) ε (for flow matching, x_{t_0} = (1-σ) x_0 + σ ε), then
run the reverse process from t_0 with the prompt. Low strength keeps the layout, high
strength follows the prompt; the trade-off is the paper's realism-faithfulness curve.

Step count: of `steps` sampler steps, the last ceil(steps × strength) run (at least one
when strength > 0). diffusers' img2img pipelines round that differently per family (SD /
SDXL run int(steps × s) steps, SD3 / FLUX steps − int(steps − steps × s)), so the pipeline
is given a strength s half a step off k that makes its rounding land on k. strength 0 returns the (fitted) input
unchanged and runs nothing; strength 1 is pure text-to-image: the family's txt2img
pipeline runs, so the image equals txt2img's for the same seed. Every family the model
manager loads works, with its own latent scaling (and SD3 / FLUX's shift).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from .images import FIT_MODES, fit_to_grid
from .models import FLOW_FAMILIES, ModelManager, family_of_pipe
from .progress import StepInfo, step_callback
from .result import Result
from .schedulers import check_scheduler, make_scheduler
from .settings import SettingsError, check_float, check_int
from .txt2img import (
    Txt2ImgSettings,
    check_family_options,
    model_defaults,
    prompt_arguments,
    sampling_defaults,
)


@dataclass(frozen=True)
class SDEditSettings(Txt2ImgSettings):
    """txt2img's settings plus the edit's: strength, how the input is fitted, and its gallery id.

    width/height are the fitted input's (filled in by `run`); the SDXL refiner and size
    conditioning don't apply.
    """

    technique = "sdedit"
    schema_version = 1

    strength: float = 0.6
    fit: str = "crop"  # or "resize": how the input is made a multiple of 8
    source_id: int | None = None  # the gallery item that was edited (the result's parent)

    def __post_init__(self):
        super().__post_init__()
        check_float("strength", self.strength, 0.0, 1.0)
        check_int("source id", self.source_id, 1, 2**63 - 1)
        if self.fit not in FIT_MODES:
            raise SettingsError(f"fit must be one of {', '.join(FIT_MODES)}, not {self.fit!r}")
        if self.refiner or self.original_size or self.target_size or self.batch_count != 1:
            raise SettingsError("SDEdit takes no refiner, size conditioning or batch count")


def denoising_steps(steps: int, strength: float) -> int:
    """How many of `steps` run: ceil(steps × strength), at least one when strength > 0."""
    if strength <= 0:
        return 0
    return min(steps, max(1, math.ceil(steps * strength - 1e-9)))


def resolve(
    settings: SDEditSettings, models: ModelManager, size: tuple[int, int]
) -> tuple[SDEditSettings, str]:
    spec = models.resolve(settings.model)
    s = settings.replace(**sampling_defaults(settings, model_defaults(spec)), width=size[0], height=size[1])
    if spec.family != "unknown":
        check_scheduler(s.scheduler, spec.family)
        check_family_options(s, spec.family)
    return s, spec.family


def run(
    settings: SDEditSettings,
    image,
    models: ModelManager,
    *,
    on_step: Callable[[StepInfo], None] | None = None,
) -> Result:
    """Edit `image` (a PIL image) by `settings.prompt`; returns batch_size images, seeds seed + i."""
    import torch

    # 1. Fit the input to the latent grid and fill unset settings from the model's defaults.
    fitted = fit_to_grid(image, settings.fit)
    s, family = resolve(settings, models, fitted.image.size)
    started = time.perf_counter()
    result = Result(settings=s, family=family, notes=[f"input {fitted.note}"])
    seeds = [s.seed + i for i in range(s.batch_size)]
    # 2. strength 0: nothing to denoise; the input comes back as it is.
    k = denoising_steps(s.steps, s.strength)
    if k == 0:
        result.notes.append("strength 0 leaves the image unchanged: nothing was generated")
        result.images, result.seeds = [fitted.image.copy() for _ in seeds], seeds
        result.duration_s = time.perf_counter() - started
        return result
    # 3. strength 1 is text-to-image; anything less starts from the noised input.
    task = "txt2img" if s.strength >= 1.0 else "img2img"
    with models.lend(s.model, task, loras=s.loras) as pipe:
        family = result.family = family if family != "unknown" else family_of_pipe(pipe)
        pipe.scheduler = make_scheduler(s.scheduler, family, pipe.scheduler.config, shift=s.shift)
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]

        if task == "txt2img":
            result.notes.append("strength 1 is pure text-to-image: the input only set the size")
            image_kwargs = {"width": s.width, "height": s.height}
        else:
            # 4. A strength half a step off k, so that the pipeline's own rounding runs exactly k steps.
            nudge = -0.5 if family in FLOW_FAMILIES else 0.5
            image_kwargs = {"image": fitted.image, "strength": min(1.0, (k + nudge) / s.steps)}
            result.notes.append(f"{k} of {s.steps} steps run (strength {s.strength:g})")
        # 5. Sample from the noised input (or from noise) and decode.
        output = pipe(
            **prompt_arguments(pipe, family, s),
            **image_kwargs,
            num_inference_steps=s.steps,
            guidance_scale=s.guidance,
            num_images_per_prompt=s.batch_size,
            generator=generators,
            callback_on_step_end=step_callback(on_step, k),
        )
        result.images, result.seeds = list(output.images), seeds
    result.duration_s = time.perf_counter() - started
    return result
