"""ControlNet and T2I-Adapter: text-to-image that follows a structure map.

Zhang, Rao & Agrawala, "Adding Conditional Control to Text-to-Image Diffusion Models"
(ICCV 2023): a trained copy of the UNet encoder reads the map c_f and adds its features to
the frozen UNet's skip connections through zero convolutions (eq. 2); each unit's residuals
are scaled by its conditioning scale and only added in its [start, end] share of the steps.
Several units add their residuals (MultiControlNet). Guess mode (§3.4 "classifier-free
guidance resolution weighting") feeds the ControlNet only the conditional branch and
scales its residuals from 0.1 (shallow) to 1 (deepest), so the map alone can drive it.
Mou et al., "T2I-Adapter" (AAAI 2024): a small encoder of the map whose features are added
to the UNet encoder's at every step; lighter, and run the same way here.

Maps come from the preprocessors (`studio.preprocessors`) or are given as they are; the
map for each unit is returned in `result.figures` so that it can be shown and stored.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from PIL import Image, ImageOps

from . import preprocessors
from .models import CONTROL_KINDS, ModelManager
from .progress import StepInfo, legacy_step_callback, step_callback
from .result import Result
from .schedulers import make_scheduler
from .settings import SettingsError, check_float, check_int
from .txt2img import Txt2ImgSettings, family_arguments, native_size, prompt_arguments
from .txt2img import resolve as resolve_txt2img

MAX_UNITS = 4


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet (or T2I-Adapter) and its map."""

    model: str = "toy-sd-controlnet-canny"
    scale: float = 1.0
    start: float = 0.0  # share of the steps before the unit starts adding its residuals
    end: float = 1.0  # share of the steps after which it stops
    preprocessor: str = "none"
    resolution: int | None = None  # the side the preprocessor works at (None: the map's own)
    threshold_a: float | None = None  # the preprocessor's thresholds (None: its defaults)
    threshold_b: float | None = None
    map_id: int | None = None  # the gallery item holding this unit's map; used as it is

    def check(self, index: int) -> None:
        name = f"control unit {index}"
        if not isinstance(self.model, str) or not self.model.strip():
            raise SettingsError(f"{name}: no ControlNet given")
        check_float(f"{name}: conditioning scale", self.scale, 0.0, 2.0)
        check_float(f"{name}: start", self.start, 0.0, 1.0)
        check_float(f"{name}: end", self.end, 0.0, 1.0)
        if self.start >= self.end:
            raise SettingsError(f"{name}: start ({self.start:g}) must come before end ({self.end:g})")
        p = preprocessors.get(self.preprocessor)
        check_int(f"{name}: preprocessor resolution", self.resolution, 64, 2048)
        for threshold, value in ((p.a, self.threshold_a), (p.b, self.threshold_b)):
            if value is None:
                continue
            if threshold is None:
                raise SettingsError(f"{name}: the {p.label} preprocessor takes no such threshold")
            check_float(f"{name}: {threshold.label}", value, threshold.lo, threshold.hi)
        check_int(f"{name}: map id", self.map_id, 1, 2**63 - 1)


@dataclass(frozen=True)
class ControlNetSettings(Txt2ImgSettings):
    technique = "controlnet"
    schema_version = 1

    units: tuple[ControlUnit, ...] = ()
    guess_mode: bool = False

    def __post_init__(self):
        super().__post_init__()
        if not self.units:
            raise SettingsError("add at least one ControlNet unit")
        if len(self.units) > MAX_UNITS:
            raise SettingsError(f"at most {MAX_UNITS} ControlNet units, not {len(self.units)}")
        for i, unit in enumerate(self.units, 1):
            if not isinstance(unit, ControlUnit):
                raise SettingsError("units must be a list of {model, scale, start, end, preprocessor, ...}")
            unit.check(i)
        if self.refiner:
            raise SettingsError("the SDXL refiner can't follow a control map; leave it out here")
        if not isinstance(self.guess_mode, bool):
            raise SettingsError("guess mode must be true or false")


def control_maps(s: ControlNetSettings, inputs: list, size: tuple[int, int]) -> tuple[list, list[str]]:
    """Each unit's map at `size` (see `unit_map`), and notes on what was fitted."""
    maps, notes = [], []
    for i, (unit, image) in enumerate(zip(s.units, inputs, strict=True), 1):
        if image is None:
            raise SettingsError(f"control unit {i} has no image: upload one or pick a stored map")
        picture, note = unit_map(unit, image, size, i)
        maps.append(picture)
        notes += [note] if note else []
    return maps, notes


def unit_map(unit: ControlUnit, image, size: tuple[int, int], index: int = 1):
    """The unit's map at `size`: its picture preprocessed (fitted to `size` first), or, with
    preprocessor none or a stored map, the picture itself, which must already be that size."""
    image = image.convert("RGB")
    if unit.preprocessor == "none" or unit.map_id is not None:
        if image.size != size:
            raise SettingsError(
                f"control map {index} is {image.width}×{image.height}, but the picture is {size[0]}×{size[1]}: "
                "give a map of that size, or pick a preprocessor (it fits its input)"
            )
        return image, ""
    note = ""
    if image.size != size:
        note = f"unit {index}: input {image.width}×{image.height} fitted to {size[0]}×{size[1]} (centre crop, resize)"
        image = ImageOps.fit(image, size, Image.Resampling.LANCZOS)
    picture = preprocessors.preprocess(
        unit.preprocessor, image, unit.resolution, unit.threshold_a, unit.threshold_b
    )
    return picture, note


def preview_map(
    models: ModelManager, model: str, width: int | None, height: int | None, unit: ControlUnit, image
):
    """The unit's map as a run on `model` at that size would make it, without running: for
    showing, and painting on, before generating."""
    size = models.output_size(model, width, height)
    if size is None:
        raise SettingsError("set the width and height: this model's own size can't be told before loading it")
    return unit_map(catalog_thresholds(models, unit), image, size)[0]


def catalog_thresholds(models: ModelManager, unit: ControlUnit) -> ControlUnit:
    """The unit with unset thresholds taken from its ControlNet's catalog entry, where that
    entry names the thresholds its training maps used for this preprocessor (the toy Canny
    ControlNet's 15/30); the result records them, so the run remakes the same map."""
    spec = models.catalog.get(unit.model.strip())
    given = spec.defaults.get("preprocessor_thresholds") if spec else None
    if not given or spec.defaults.get("preprocessor") != unit.preprocessor:
        return unit
    a = unit.threshold_a if unit.threshold_a is not None else given[0]
    b = unit.threshold_b if unit.threshold_b is not None else given[1]
    return replace(unit, threshold_a=a, threshold_b=b)


def run(
    settings: ControlNetSettings,
    inputs: list,
    models: ModelManager,
    *,
    on_step: Callable[[StepInfo], None] | None = None,
) -> Result:
    """Generate following each unit's map; `inputs[i]` is unit i's picture (PIL)."""
    import torch

    # 1. Fill unset settings (the size too) from the model's defaults.
    s, family = resolve_txt2img(settings, models)
    s = s.replace(units=tuple(catalog_thresholds(models, u) for u in s.units))
    task = models.resolve_control(s.units[0].model).kind
    if task not in CONTROL_KINDS:
        raise SettingsError(f"{s.units[0].model} is not a ControlNet or T2I-Adapter")
    if task == "t2i-adapter" and (s.guess_mode or any(u.start > 0 or u.end < 1 for u in s.units)):
        raise SettingsError("T2I-Adapters act at every step: guess mode and start/end are for ControlNets")
    started = time.perf_counter()
    with models.lend(s.model, task, loras=s.loras, controls=tuple(u.model for u in s.units)) as pipe:
        size = native_size(pipe)
        s = s.replace(width=s.width or size, height=s.height or size)
        # 2. The maps: preprocessed inputs, or maps given as they are (checked for size).
        maps, notes = control_maps(s, inputs, (s.width, s.height))
        result = Result(settings=s, family=family, notes=notes)
        pipe.scheduler = make_scheduler(s.scheduler, family, pipe.scheduler.config, shift=s.shift)
        one = len(s.units) == 1
        if task == "controlnet":
            control = {
                "controlnet_conditioning_scale": s.units[0].scale if one else [u.scale for u in s.units],
                "control_guidance_start": s.units[0].start if one else [u.start for u in s.units],
                "control_guidance_end": s.units[0].end if one else [u.end for u in s.units],
                "guess_mode": s.guess_mode,
            }
        else:
            control = {"adapter_conditioning_scale": s.units[0].scale if one else [u.scale for u in s.units]}

        def progress(*args):
            if task == "controlnet":
                return {"callback_on_step_end": step_callback(*args)}
            return {"callback": legacy_step_callback(*args)}  # the adapter pipelines' older hook

        for batch in range(s.batch_count):
            # 3. One generator per image, seeded seed + index, on the CPU.
            seeds = [s.seed + batch * s.batch_size + i for i in range(s.batch_size)]
            generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
            # 4. Sample: the units' residuals join the UNet's in their step windows.
            output = pipe(
                **prompt_arguments(pipe, family, s),
                image=maps[0] if one else maps,
                num_inference_steps=s.steps,
                guidance_scale=s.guidance,
                width=s.width,
                height=s.height,
                num_images_per_prompt=s.batch_size,
                generator=generators,
                **progress(on_step, s.steps, batch, s.batch_count),
                **control,
                **family_arguments(family, s),
            )
            result.images += list(output.images)
            result.seeds += seeds
    result.figures = {f"control map {i}": m for i, m in enumerate(maps, 1)}
    result.duration_s = time.perf_counter() - started
    return result
