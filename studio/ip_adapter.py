"""IP-Adapter: image prompts through decoupled cross-attention.

Ye et al., "IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image Diffusion
Models" (2023). A frozen image encoder embeds each reference picture; a small trained
projection turns the embedding into a few image tokens c_i; every cross-attention layer of
the frozen UNet gets new key / value projections for them and adds a SECOND attention to
the text one (eq. 5):

    Z_new = Softmax(Q K^T / √d) V + λ · Softmax(Q K'^T / √d) V',   K' = c_i W'_k, V' = c_i W'_v

λ is the adapter's scale (0: the base model exactly). Several adapters add one such term
each, with their own λ; several references of one adapter put all their tokens in its one
softmax; a mask limits an adapter's term to a region of the picture (diffusers'
`ip_adapter_masks`). In classifier-free guidance the unconditional branch gets the empty
prompt AND a zero image embedding — the reference is dropped together with the text, as in
the paper's training. Adapters load through diffusers' `load_ip_adapter` /
`set_ip_adapter_scale` on a pipeline the model manager lends (`ip_adapters=`), which puts
the UNet back as it was afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from .models import ModelManager
from .progress import StepInfo, step_callback
from .result import Result
from .schedulers import make_scheduler
from .settings import SettingsError, check_float, check_int
from .txt2img import Txt2ImgSettings, family_arguments, native_size, prompt_arguments
from .txt2img import resolve as resolve_txt2img

MAX_ADAPTERS = 3
MAX_REFERENCES = 4  # a unit's reference pictures
REFERENCE_TECHNIQUE = "reference"  # the gallery technique of a stored reference picture
MASK_TECHNIQUE = "ip mask"  # ... and of a stored mask


@dataclass(frozen=True)
class IPAdapterUnit:
    """One adapter, its scale λ, how many of the run's reference pictures it reads, and a mask."""

    adapter: str = "toy-ip-adapter"
    scale: float = 1.0
    references: int = 1
    reference_ids: tuple[int, ...] = ()  # gallery items holding its references (set once stored)
    masked: bool = False  # a mask picture limits where the adapter acts
    mask_id: int | None = None  # the gallery item holding the mask (set once stored)

    def check(self, index: int) -> None:
        name = f"IP-Adapter {index}"
        if not isinstance(self.adapter, str) or not self.adapter.strip():
            raise SettingsError(f"{name}: no adapter given")
        check_float(f"{name}: scale", self.scale, 0.0, 2.0)
        check_int(f"{name}: references", self.references, 1, MAX_REFERENCES)
        if self.reference_ids and len(self.reference_ids) != self.references:
            raise SettingsError(
                f"{name}: {len(self.reference_ids)} stored references for {self.references} reference pictures"
            )
        for i in self.reference_ids:
            check_int(f"{name}: reference id", i, 1, 2**63 - 1)
        if not isinstance(self.masked, bool):
            raise SettingsError(f"{name}: masked must be true or false")
        check_int(f"{name}: mask id", self.mask_id, 1, 2**63 - 1)
        if self.mask_id is not None and not self.masked:
            raise SettingsError(f"{name}: a stored mask is named but masked is false")


@dataclass(frozen=True)
class IPAdapterSettings(Txt2ImgSettings):
    technique = "ip_adapter"
    schema_version = 1

    units: tuple[IPAdapterUnit, ...] = (IPAdapterUnit(),)

    def __post_init__(self):
        super().__post_init__()
        if not self.units:
            raise SettingsError("add at least one IP-Adapter")
        if len(self.units) > MAX_ADAPTERS:
            raise SettingsError(f"at most {MAX_ADAPTERS} IP-Adapters, not {len(self.units)}")
        for i, unit in enumerate(self.units, 1):
            if not isinstance(unit, IPAdapterUnit):
                raise SettingsError("units must be a list of {adapter, scale, references, ...}")
            unit.check(i)
        if self.refiner:
            raise SettingsError("the SDXL refiner doesn't read image prompts; leave it out here")

    @property
    def reference_count(self) -> int:
        return sum(u.references for u in self.units)


def group_references(s: IPAdapterSettings, references: list) -> list[list]:
    """The flat list of reference pictures split into each unit's, in order."""
    if len(references) != s.reference_count:
        raise SettingsError(
            f"{len(s.units)} IP-Adapter(s) read {s.reference_count} reference picture(s), "
            f"but {len(references)} were given"
        )
    groups, start = [], 0
    for unit in s.units:
        groups.append(references[start : start + unit.references])
        start += unit.references
    return groups


def mask_tensors(s: IPAdapterSettings, masks: list, size: tuple[int, int]) -> list | None:
    """diffusers' `ip_adapter_masks`: per unit a (1, references, H, W) tensor in {0, 1}, or None."""
    if not any(u.masked for u in s.units):
        return None
    from diffusers.image_processor import IPAdapterMaskProcessor

    processor = IPAdapterMaskProcessor()
    out = []
    for i, (unit, mask) in enumerate(zip(s.units, masks, strict=True), 1):
        if not unit.masked:
            out.append(None)
            continue
        if mask is None:
            raise SettingsError(f"IP-Adapter {i} is masked but has no mask picture")
        tensor = processor.preprocess([mask.convert("L")], height=size[1], width=size[0])
        out.append(tensor.reshape(1, 1, *tensor.shape[-2:]).repeat(1, unit.references, 1, 1))
    return out


def run(
    settings: IPAdapterSettings,
    references: list,
    models: ModelManager,
    *,
    masks: list | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
) -> Result:
    """Generate with image prompts; `references` are the units' pictures in order (PIL),
    `masks` one per unit (None where a unit has none)."""
    import torch

    # 1. Fill unset settings from the model's defaults; the pictures, per unit.
    s, family = resolve_txt2img(settings, models)
    groups = group_references(s, [r.convert("RGB") for r in references])
    masks = list(masks) if masks is not None else [None] * len(s.units)
    if len(masks) != len(s.units):
        raise SettingsError(f"{len(s.units)} IP-Adapter(s) but {len(masks)} mask entries")
    notes = [
        f"reference {i}: {r.width}×{r.height} centre-cropped to a square by the image encoder"
        for i, r in enumerate((r for g in groups for r in g), 1)
        if r.width != r.height
    ]
    started = time.perf_counter()
    embeddings = models.embeddings_for(s.prompt, s.negative_prompt)
    adapters = tuple(u.adapter for u in s.units)
    # 2. A pipeline with the adapters loaded into its UNet (put back when the block ends).
    with models.lend(s.model, "txt2img", loras=s.loras, embeddings=embeddings, ip_adapters=adapters) as pipe:
        size = native_size(pipe)
        s = s.replace(width=s.width or size, height=s.height or size)
        result = Result(settings=s, family=family, notes=notes)
        pipe.scheduler = make_scheduler(s.scheduler, family, pipe.scheduler.config, shift=s.shift)
        # 3. Each adapter's λ; its references (one picture, or a list whose tokens share its softmax).
        pipe.set_ip_adapter_scale([u.scale for u in s.units])
        images = [g[0] if len(g) == 1 else g for g in groups]
        attention = {}
        if (tensors := mask_tensors(s, masks, (s.width, s.height))) is not None:
            attention["cross_attention_kwargs"] = {"ip_adapter_masks": tensors}
        for batch in range(s.batch_count):
            # 4. One generator per image, seeded seed + index, on the CPU.
            seeds = [s.seed + batch * s.batch_size + i for i in range(s.batch_size)]
            generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
            # 5. Sample: guidance's unconditional branch gets the empty prompt and a zero image embedding.
            output = pipe(
                **prompt_arguments(pipe, family, s),
                ip_adapter_image=images,
                num_inference_steps=s.steps,
                guidance_scale=s.guidance,
                width=s.width,
                height=s.height,
                num_images_per_prompt=s.batch_size,
                generator=generators,
                callback_on_step_end=step_callback(on_step, s.steps, batch, s.batch_count),
                **attention,
                **family_arguments(family, s),
            )
            result.images += list(output.images)
            result.seeds += seeds
    result.figures = {f"reference {i}": r for i, r in enumerate((r for g in groups for r in g), 1)}
    for i, mask in enumerate(masks, 1):
        if mask is not None and s.units[i - 1].masked:
            result.figures[f"mask {i}"] = mask.convert("L")
    result.duration_s = time.perf_counter() - started
    return result
