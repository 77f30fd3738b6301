"""The model manager: the only code that loads, moves, caches and evicts weights.

* A catalog (`catalog.json`) names models; a hub id, a local diffusers folder or a single
  `.safetensors` file works too. Weights load from safetensors only: pickles are refused.
* Device and dtype policy: cuda, then mps, then cpu; fp16 (bf16 for SD3 / FLUX where the
  card has it) on accelerators, fp32 on the CPU. Offload modes none / model / sequential.
* An LRU cache of whole pipelines under a byte budget; evicting really frees memory.
  A pipeline for another task (img2img, ...) is built from the loaded one with
  `from_pipe`, sharing its modules instead of loading them again.
* One lane: `lend()` holds a lock for its `with` block, so one generation or training
  step uses the weights at a time, and everything it patched (LoRAs, attention
  processors) is undone when the block ends.
Nothing is probed or loaded at import or construction; the first `lend()` does it.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CATALOG_PATH = Path(__file__).with_name("catalog.json")
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")

# Pipeline class per family and task. Families absent from a task cannot do it.
PIPELINES = {
    "sd": {
        "txt2img": "StableDiffusionPipeline",
        "img2img": "StableDiffusionImg2ImgPipeline",
        "ip2p": "StableDiffusionInstructPix2PixPipeline",
        "controlnet": "StableDiffusionControlNetPipeline",
        "t2i-adapter": "StableDiffusionAdapterPipeline",
    },
    "sdxl": {
        "txt2img": "StableDiffusionXLPipeline",
        "img2img": "StableDiffusionXLImg2ImgPipeline",
        "controlnet": "StableDiffusionXLControlNetPipeline",
        "t2i-adapter": "StableDiffusionXLAdapterPipeline",
    },
    "sdxl-refiner": {"img2img": "StableDiffusionXLImg2ImgPipeline"},
    "sd3": {"txt2img": "StableDiffusion3Pipeline", "img2img": "StableDiffusion3Img2ImgPipeline"},
    "flux": {"txt2img": "FluxPipeline", "img2img": "FluxImg2ImgPipeline"},
}
CLASS_FAMILY = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionControlNetPipeline": "sd",
    "StableDiffusionAdapterPipeline": "sd",
    "StableDiffusionXLControlNetPipeline": "sdxl",
    "StableDiffusionXLAdapterPipeline": "sdxl",
    "StableDiffusionInstructPix2PixPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl-refiner",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}
FLOW_FAMILIES = ("sd3", "flux")
CONTROL_KINDS = ("controlnet", "t2i-adapter")  # modules a pipeline borrows for structure control
CONTROL_CLASSES = {"ControlNetModel": "controlnet", "T2IAdapter": "t2i-adapter"}
IP_ADAPTER_KIND = "ip-adapter"  # image-prompt adapters (IP-Adapter, InstantID's identity adapter)
IP_ADAPTER_TASKS = ("txt2img", "img2img", "controlnet")


class ModelError(ValueError):
    """A model can't be had; the message names it and says what to do."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str  # hub id, folder or file
    family: str
    kind: str = "pipeline"  # or "ip2p" (an InstructPix2Pix pipeline), "lora", "controlnet", "t2i-adapter"
    description: str = ""
    defaults: dict = field(default_factory=dict, hash=False, compare=False)
    single_file: bool = False
    config: str | None = None  # local diffusers folder giving a single file its configs

    @property
    def local(self) -> bool:
        return Path(self.source).exists()


@dataclass(frozen=True)
class LoraRef:
    """One LoRA of a stack: a catalog name, a .safetensors file or a folder, and its weight."""

    source: str
    weight: float = 1.0


def load_catalog(path: Path = CATALOG_PATH) -> dict[str, ModelSpec]:
    entries = json.loads(path.read_text())
    specs = {}
    for name, e in entries.items():
        source = e["source"]
        if source.startswith("assets/"):
            source = str(REPO_ROOT / source)
        defaults = {
            k: e[k]
            for k in (
                "scheduler",
                "steps",
                "guidance",
                "width",
                "height",
                "distilled",
                "refiner",
                "latent_rgb",
                "image_guidance",
                "preprocessor",
                "preprocessor_thresholds",
                "subfolder",
                "weight_name",
                "image_encoder",
                "cross_replace",
                "self_replace",
            )
            if k in e
        }
        specs[name] = ModelSpec(
            name, source, e["family"], e.get("kind", "pipeline"), e.get("description", ""), defaults
        )
    return specs


def refuse_pickle(path: str) -> None:
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise ModelError(
            f"{Path(path).name} is a pickle checkpoint, which can run arbitrary code when loaded; "
            "the studio loads .safetensors only. Convert it once on a trusted machine "
            "(or download the .safetensors version of the model)."
        )


def trained_specs(user_dir: Path) -> dict[str, ModelSpec]:
    """LoRAs (loras/*.safetensors) and fine-tuned models (models/<name>/) this studio trained."""
    specs = {}
    for path in sorted((user_dir / "loras").glob("*.safetensors")):
        note = _note(path.with_suffix(".json"))
        family = note.get("family", "unknown")
        specs[path.stem] = ModelSpec(
            path.stem, str(path), family, "lora", f"trained here on {note.get('base', '?')}"
        )
    for folder in sorted((user_dir / "models").glob("*/model_index.json")):
        with contextlib.suppress(ModelError):
            name = folder.parent.name
            specs[name] = ModelSpec(
                name, str(folder.parent), family_of_folder(folder.parent), "pipeline", "trained here"
            )
    return specs


def _note(path: Path) -> dict:
    try:
        note = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return note if isinstance(note, dict) else {}


def safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception:  # a damaged file lists nothing rather than breaking every prompt
        return []


def family_of_folder(folder: Path) -> str:
    index = folder / "model_index.json"
    if not index.exists():
        raise ModelError(f"{folder} is not a diffusers pipeline folder (it has no model_index.json)")
    cls = json.loads(index.read_text()).get("_class_name", "")
    for prefix, family in CLASS_FAMILY.items():
        if cls == prefix:
            return family
    if cls.startswith("StableDiffusionXL"):
        return "sdxl"
    if cls.startswith("StableDiffusion3"):
        return "sd3"
    if cls.startswith("Flux"):
        return "flux"
    if cls.startswith("StableDiffusion"):
        return "sd"
    raise ModelError(f"{folder} holds a {cls or 'unknown'} pipeline, which the studio does not run")


def _check_fits(module, unet, name: str, model: str) -> None:
    """A ControlNet's residuals (or an adapter's features) must match the UNet's blocks: same
    cross-attention width and block channels, else the run would fail midway."""
    if unet is None:
        return
    mine, base = module.config, unet.config
    keys = ("cross_attention_dim", "block_out_channels") if "cross_attention_dim" in mine else ()
    for key in keys:
        if _as_tuple(mine.get(key)) != _as_tuple(base.get(key)):
            raise ModelError(
                f"{name} was made for another base model ({key} {mine.get(key)}, {model} has {base.get(key)}): "
                "pick a ControlNet trained for this model"
            )
    channels = mine.get("channels")
    if channels and tuple(channels) != tuple(base["block_out_channels"])[: len(channels)]:
        raise ModelError(
            f"{name} was made for another base model (channels {channels}): pick one for {model}"
        )


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def native_size_of_folder(folder: Path) -> int | None:
    """The image side a diffusers folder makes: denoiser sample size × 2^(VAE levels - 1)."""
    try:
        denoiser = next(
            json.loads((folder / sub / "config.json").read_text())
            for sub in ("unet", "transformer")
            if (folder / sub / "config.json").is_file()
        )
        vae = json.loads((folder / "vae" / "config.json").read_text())
        return int(denoiser["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (StopIteration, OSError, ValueError, KeyError, TypeError):
        return None


def tensor_names(path: Path) -> list[str]:
    """The tensor names in a .safetensors file's header (no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return list(f.keys())
    except Exception as exc:
        raise ModelError(f"{path.name} is not a readable .safetensors file ({exc})") from None


def family_of_single_file(path: Path) -> str:
    """Guess an original-format checkpoint's family from its tensor names (header only)."""
    keys = tensor_names(path)
    if any(k.startswith("conditioner.embedders.1") for k in keys):
        return "sdxl"
    if any("joint_blocks." in k for k in keys):
        return "sd3"
    if any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in keys):
        return "flux"
    if any(k.startswith("model.diffusion_model.input_blocks") for k in keys):
        return "sd"
    raise ModelError(f"{path.name} is not a Stable Diffusion, SDXL, SD3 or FLUX checkpoint")


def _absent_components(folder: Path) -> dict:
    """Components a folder saved as null (SD3 without T5, say) are passed as None."""
    index = json.loads((folder / "model_index.json").read_text())
    return {k: None for k, v in index.items() if isinstance(v, list) and v == [None, None]}


def module_bytes(pipe) -> int:
    import torch

    total = 0
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            total += sum(t.numel() * t.element_size() for t in component.parameters())
            total += sum(t.numel() * t.element_size() for t in component.buffers())
    return total


class ModelManager:
    def __init__(
        self,
        *,
        device: str | None = None,
        dtype: str | None = None,
        offload: str = "none",
        budget_bytes: int | None = None,
        catalog: dict[str, ModelSpec] | None = None,
        user_dir: Path | None = None,
    ):
        if offload not in ("none", "model", "sequential"):
            raise ModelError(f"offload must be none, model or sequential, not {offload!r}")
        self._device_name = device
        self._dtype_name = dtype
        self.offload = offload
        self.budget_bytes = budget_bytes
        self._catalog = catalog
        self.user_dir = (
            Path(user_dir) if user_dir else None
        )  # what this studio trained: loras/, embeddings/, models/
        self._cache: OrderedDict[str, object] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self.lane = threading.RLock()
        self.load_seconds: dict[str, float] = {}

    # ------------------------------------------------------------------ catalog and resolution

    @property
    def catalog(self) -> dict[str, ModelSpec]:
        """The shipped catalog, plus what this studio trained (catalog names win a clash)."""
        if self._catalog is None:
            self._catalog = load_catalog()
        return {**trained_specs(self.user_dir), **self._catalog} if self.user_dir else self._catalog

    def embeddings(self) -> dict[str, Path]:
        """Trained textual-inversion words → their files (a word in a prompt loads its file)."""
        found = {}
        for path in sorted((self.user_dir / "embeddings").glob("*.safetensors")) if self.user_dir else ():
            found.update(dict.fromkeys(safetensors_keys(path), path))
        return found

    def embeddings_for(self, *texts: str) -> tuple[str, ...]:
        """The files of the trained words that appear in `texts`."""
        return tuple(str(p) for word, p in self.embeddings().items() if any(word in t for t in texts if t))

    def install_trained(self, output: Path, method: str, base: ModelSpec, settings: dict) -> Path:
        """Copy a training run's output where the catalog finds it (loras/, embeddings/ or
        models/ of `user_dir`), with a note of the base model and the settings beside it."""
        if self.user_dir is None:
            return output
        folder = self.user_dir / {"lora": "loras", "textual-inversion": "embeddings"}.get(method, "models")
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / output.name
        partial = folder / f".partial-{output.name}"
        shutil.rmtree(partial, ignore_errors=True)
        (shutil.copytree if output.is_dir() else shutil.copy2)(output, partial)
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(partial, target)
        note = {"family": base.family, "base": base.name, "method": method, "settings": settings}
        (folder / f"{Path(output.name).stem}.json").write_text(json.dumps(note, indent=1))
        return target

    def pipelines(self, kind: str = "pipeline") -> list[ModelSpec]:
        return [s for s in self.catalog.values() if s.kind == kind]

    def loras(self) -> list[ModelSpec]:
        return [s for s in self.catalog.values() if s.kind == "lora"]

    def resolve(self, name: str) -> ModelSpec:
        """A catalog name, a local folder, a .safetensors file or a hub id, as a ModelSpec."""
        if not isinstance(name, str) or not name.strip():
            raise ModelError("no model given: choose one from the catalog or give a folder, file or hub id")
        name = name.strip()
        if name in self.catalog:
            return self.catalog[name]
        refuse_pickle(name)
        path = Path(name).expanduser()
        if path.is_dir():
            return ModelSpec(str(path), str(path), family_of_folder(path))
        if path.is_file():
            if path.suffix != ".safetensors":
                raise ModelError(f"{path.name} is not a .safetensors checkpoint")
            return ModelSpec(str(path), str(path), family_of_single_file(path), single_file=True)
        if _looks_like_hub_id(name):
            return ModelSpec(name, name, "unknown")
        raise ModelError(
            f"unknown model {name!r}: not in the catalog ({', '.join(s.name for s in self.pipelines())}), "
            "not an existing folder or .safetensors file, and not a hub id like org/name"
        )

    # ------------------------------------------------------------------ device policy

    @property
    def device(self) -> str:
        if self._device_name is None:
            import torch

            if torch.cuda.is_available():
                self._device_name = "cuda"
            elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
                self._device_name = "mps"
            else:
                self._device_name = "cpu"
        return self._device_name

    def dtype_for(self, family: str):
        import torch

        if self._dtype_name:
            return getattr(torch, self._dtype_name)
        if self.device == "cpu":
            return torch.float32
        if family in FLOW_FAMILIES and self.device == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16

    def output_size(
        self, name: str, width: int | None = None, height: int | None = None
    ) -> tuple[int, int] | None:
        """The picture size a run makes: the given one, else the catalog's, else (for a local
        folder) its denoiser's sample size × the VAE's scale, read from the configs without
        loading anything; None when only loading could tell."""
        spec = self.resolve(name)
        width, height = width or spec.defaults.get("width"), height or spec.defaults.get("height")
        if width and height:
            return int(width), int(height)
        side = native_size_of_folder(Path(spec.source)) if spec.local and not spec.single_file else None
        width, height = width or side, height or side
        return (int(width), int(height)) if width and height else None

    # ------------------------------------------------------------------ loading and the cache

    def cached(self) -> list[str]:
        return list(self._cache)

    def cache_bytes(self) -> int:
        return sum(self._sizes.values())

    def _pipeline_class(self, family: str, task: str):
        import diffusers

        try:
            return getattr(diffusers, PIPELINES[family][task])
        except KeyError:
            raise ModelError(f"{family} models can't do {task}") from None

    def base(self, name: str):
        """The cached base pipeline of a model, loaded on first use. Caller holds the lane."""
        spec = self.resolve(name)
        if spec.kind not in ("pipeline", "ip2p"):
            raise ModelError(
                f"{spec.name} is a {spec.kind}, not a base model; add it to a LoRA stack instead"
            )
        with self.lane:
            if spec.source in self._cache:
                self._cache.move_to_end(spec.source)
                return self._cache[spec.source]
            started = time.perf_counter()
            pipe = self._load(spec)
            size = module_bytes(pipe)
            self._make_room(size)
            self._place(pipe)
            self._cache[spec.source] = pipe
            self._sizes[spec.source] = size
            self.load_seconds[spec.source] = time.perf_counter() - started
            return pipe

    def _load(self, spec: ModelSpec, dtype=None):
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()

        family = spec.family
        dtype = dtype or self.dtype_for(family)
        try:
            if spec.single_file:
                cls = self._pipeline_class(family, "txt2img" if family != "sdxl-refiner" else "img2img")
                kwargs = {"config": spec.config} if spec.config else {}
                return cls.from_single_file(spec.source, dtype=dtype, **kwargs)
            if spec.local:
                absent = _absent_components(Path(spec.source))
                return diffusers.DiffusionPipeline.from_pretrained(
                    spec.source, dtype=dtype, use_safetensors=True, local_files_only=True, **absent
                )
            return diffusers.DiffusionPipeline.from_pretrained(spec.source, dtype=dtype, use_safetensors=True)
        except ModelError:
            raise
        except (OSError, ValueError) as exc:
            raise ModelError(_load_failure(spec, exc)) from None

    def _place(self, pipe) -> None:
        if self.device == "cpu" or self.offload == "none":
            pipe.to(self.device)
        elif self.offload == "model":
            pipe.enable_model_cpu_offload(device=self.device)
        else:
            pipe.enable_sequential_cpu_offload(device=self.device)
        pipe.set_progress_bar_config(disable=True)

    def _make_room(self, incoming: int) -> None:
        if self.budget_bytes is None:
            return
        while self._cache and self.cache_bytes() + incoming > self.budget_bytes:
            self.evict(next(iter(self._cache)))

    def evict(self, source_or_name: str) -> None:
        with self.lane:
            key = source_or_name
            if key not in self._cache and key in self.catalog:
                key = self.catalog[key].source
            pipe = self._cache.pop(key, None)
            self._sizes.pop(key, None)
            if pipe is None:
                return
            with contextlib.suppress(Exception):
                pipe.remove_all_hooks()
            del pipe
            gc.collect()
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def clear(self) -> None:
        for key in list(self._cache):
            self.evict(key)

    # ------------------------------------------------------------------ lending

    @contextlib.contextmanager
    def lend(
        self,
        name: str,
        task: str = "txt2img",
        *,
        loras: tuple[LoraRef, ...] = (),
        attn_processors: dict | object | None = None,
        controls: tuple[str, ...] = (),
        embeddings: tuple[str, ...] = (),
        ip_adapters: tuple[str, ...] = (),
    ) -> Iterator[object]:
        """A pipeline for `task` on model `name`, held on the lane for the block.

        The lent pipeline shares modules with the cached base (`from_pipe`), so the caller
        may set its scheduler freely; LoRAs and attention processors it asks for are
        applied to the shared modules and removed again when the block ends (`attn_processors`
        is a name → processor dict, or one processor for every layer). For the tasks
        "controlnet" and "t2i-adapter", `controls` names the ControlNets or T2I-Adapters the
        pipeline borrows (several: diffusers' Multi* wrapper), each cached like a model.
        `embeddings` are textual-inversion files whose words the prompt may use.
        `ip_adapters` names IP-Adapters (catalog names, folders, .safetensors files, hub files)
        loaded into the UNet with `load_ip_adapter`, one image-embedding list entry each, their
        image encoder lent with the pipeline; the UNet's processors and image projection are
        put back as they were when the block ends.
        """
        with self.lane:
            base = self.base(name)
            spec = self.resolve(name)
            family = spec.family if spec.family != "unknown" else family_of_pipe(base)
            cls = self._pipeline_class(family, task)
            _check_task(spec, base, task)
            extra = self._control_components(task, controls, family, spec.name, getattr(base, "unet", None))
            adapters = self._ip_adapter_components(
                task, ip_adapters, family, spec.name, base, attn_processors
            )
            if adapters:
                extra.update(adapters["components"])
            pipe = base if type(base) is cls and not extra else cls.from_pipe(base, **extra)
            pipe.set_progress_bar_config(disable=True)
            denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
            saved_processors = dict(denoiser.attn_processors) if attn_processors is not None else None
            saved_ip = _ip_state(denoiser) if adapters else None
            try:
                if loras:
                    self._apply_loras(pipe, family, loras)
                if embeddings:
                    self._apply_embeddings(pipe, embeddings)
                if adapters:
                    self._apply_ip_adapters(pipe, adapters["weights"], ip_adapters)
                if attn_processors is not None:
                    denoiser.set_attn_processor(attn_processors)
                yield pipe
            finally:
                if saved_ip is not None:
                    _restore_ip_state(denoiser, saved_ip)
                if loras:
                    pipe.unload_lora_weights()
                if embeddings:
                    pipe.unload_textual_inversion()
                if saved_processors is not None:
                    denoiser.set_attn_processor(saved_processors)

    # ------------------------------------------------------------------ ControlNets and T2I-Adapters

    def resolve_control(self, name: str) -> ModelSpec:
        """A ControlNet or T2I-Adapter: a catalog name, a folder, a single .safetensors file or a hub id."""
        if not isinstance(name, str) or not name.strip():
            raise ModelError("no ControlNet given")
        name = name.strip()
        if name in self.catalog:
            spec = self.catalog[name]
            if spec.kind not in CONTROL_KINDS:
                raise ModelError(f"{name} is a {spec.kind}, not a ControlNet or T2I-Adapter")
            return spec
        refuse_pickle(name)
        path = Path(name).expanduser()
        if path.is_dir():
            kind, family = control_of_folder(path)
            return ModelSpec(str(path), str(path), family, kind)
        if path.is_file():
            if path.suffix != ".safetensors":
                raise ModelError(f"{path.name} is not a .safetensors file")
            return ModelSpec(
                str(path), str(path), family_of_control_file(path), "controlnet", single_file=True
            )
        if _looks_like_hub_id(name):
            kind = "t2i-adapter" if "adapter" in name.lower() else "controlnet"
            return ModelSpec(name, name, "unknown", kind)
        raise ModelError(
            f"unknown ControlNet {name!r}: not in the catalog "
            f"({', '.join(s.name for s in self.catalog.values() if s.kind in CONTROL_KINDS)}), "
            "not a folder or .safetensors file, and not a hub id like org/name"
        )

    def control(self, name: str):
        """The cached ControlNetModel / T2IAdapter `name`, loaded on first use. Caller holds the lane."""
        spec = self.resolve_control(name)
        key = f"{spec.kind}:{spec.source}"
        with self.lane:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key], spec
            import diffusers

            cls = diffusers.ControlNetModel if spec.kind == "controlnet" else diffusers.T2IAdapter
            dtype = self.dtype_for("sd")
            try:
                if spec.single_file:
                    module = cls.from_single_file(spec.source, dtype=dtype)
                else:
                    module = cls.from_pretrained(
                        spec.source, dtype=dtype, use_safetensors=True, local_files_only=spec.local
                    )
            except (OSError, ValueError) as exc:
                raise ModelError(_load_failure(spec, exc)) from None
            size = sum(t.numel() * t.element_size() for t in module.parameters())
            self._make_room(size)
            module.to(self.device)
            self._cache[key] = module
            self._sizes[key] = size
            return module, spec

    def _control_components(
        self, task: str, controls: tuple[str, ...], family: str, model: str, unet=None
    ) -> dict:
        """The `controlnet=` / `adapter=` argument of a control pipeline, families checked."""
        if task not in CONTROL_KINDS:
            if controls:
                raise ModelError(f"{task} takes no ControlNets")
            return {}
        if not controls:
            raise ModelError(f"{task} needs at least one {task}")
        import diffusers

        modules = []
        for name in controls:
            module, spec = self.control(name)
            kind, own = control_of_config(module.config, type(module).__name__)
            if kind != task:
                raise ModelError(f"{spec.name} is a {kind}; this run uses {task}s: don't mix the two")
            if own != family:
                raise ModelError(
                    f"{kind} {spec.name} is for {FAMILY_NAMES[own]} models, but {model} is {FAMILY_NAMES[family]}"
                )
            _check_fits(module, unet, spec.name, model)
            modules.append(module)
        if task == "controlnet":
            return {
                "controlnet": modules[0] if len(modules) == 1 else diffusers.MultiControlNetModel(modules)
            }
        return {"adapter": modules[0] if len(modules) == 1 else diffusers.MultiAdapter(modules)}

    # ------------------------------------------------------------------ IP-Adapters

    def ip_adapters(self) -> list[ModelSpec]:
        return [s for s in self.catalog.values() if s.kind == IP_ADAPTER_KIND]

    def resolve_ip_adapter(self, name: str) -> ModelSpec:
        """An IP-Adapter: a catalog name, a folder holding one adapter .safetensors (and maybe
        `image_encoder/`), such a file, or a hub file `org/repo/[sub/]file.safetensors`.
        `defaults` carry subfolder, weight_name and image_encoder (a folder, or None)."""
        if not isinstance(name, str) or not name.strip():
            raise ModelError("no IP-Adapter given")
        name = name.strip()
        if name in self.catalog:
            spec = self.catalog[name]
            if spec.kind != IP_ADAPTER_KIND:
                raise ModelError(f"{name} is a {spec.kind}, not an IP-Adapter")
            return spec
        if name.lower().endswith(PICKLE_SUFFIXES):
            raise ModelError(
                f"{Path(name).name} is a pickle, which can run arbitrary code when loaded; convert it once "
                f"with `python -m studio convert-ip-adapter {name}` (weights only) and use the .safetensors"
            )
        path = Path(name).expanduser()
        if path.is_dir():
            files = [f for f in sorted(path.glob("*.safetensors")) if _is_ip_adapter_file(f)]
            if len(files) != 1:
                found = "none" if not files else ", ".join(f.name for f in files)
                raise ModelError(
                    f"{path} should hold exactly one IP-Adapter .safetensors (image_proj.* and ip_adapter.* "
                    f"tensors); found {found}: name the file instead"
                )
            path = files[0]
        if path.is_file():
            if path.suffix != ".safetensors" or not _is_ip_adapter_file(path):
                raise ModelError(
                    f"{path.name} is not an IP-Adapter .safetensors (no image_proj.* / ip_adapter.* tensors)"
                )
            encoder = path.parent / "image_encoder"
            defaults = {"weight_name": path.name, "image_encoder": str(encoder) if encoder.is_dir() else None}
            return ModelSpec(str(path), str(path.parent), "unknown", IP_ADAPTER_KIND, defaults=defaults)
        parts = name.split("/")
        if len(parts) >= 3 and parts[-1].endswith(".safetensors") and _looks_like_hub_id("/".join(parts[:2])):
            sub = "/".join(parts[2:-1])
            defaults = {
                "subfolder": sub,
                "weight_name": parts[-1],
                "image_encoder": f"{sub}/image_encoder" if sub else "image_encoder",
            }
            return ModelSpec(name, "/".join(parts[:2]), "unknown", IP_ADAPTER_KIND, defaults=defaults)
        raise ModelError(
            f"unknown IP-Adapter {name!r}: not in the catalog "
            f"({', '.join(s.name for s in self.ip_adapters())}), not a folder or .safetensors file, and "
            "not a hub file like h94/IP-Adapter/models/ip-adapter_sd15.safetensors"
        )

    def ip_adapter_weights(self, name: str) -> tuple[dict, ModelSpec]:
        """The adapter's tensors as load_ip_adapter's dict {"image_proj": ..., "ip_adapter": ...},
        cached; read from safetensors only."""
        spec = self.resolve_ip_adapter(name)
        d = spec.defaults
        key = f"{IP_ADAPTER_KIND}:{spec.source}/{d.get('subfolder') or ''}/{d['weight_name']}"
        with self.lane:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key], spec
            from safetensors import safe_open

            path = self._ip_adapter_file(spec)
            weights: dict = {"image_proj": {}, "ip_adapter": {}}
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for k in f.keys():
                    group, _, rest = k.partition(".")
                    if group in weights:
                        weights[group][rest] = f.get_tensor(k)
            size = sum(t.numel() * t.element_size() for g in weights.values() for t in g.values())
            self._make_room(size)
            self._cache[key] = weights
            self._sizes[key] = size
            return weights, spec

    def _ip_adapter_file(self, spec: ModelSpec) -> Path:
        d = spec.defaults
        if spec.local:
            path = Path(spec.source) / (d.get("subfolder") or "") / d["weight_name"]
            if not path.is_file():
                raise ModelError(f"IP-Adapter {spec.name!r}: {path} is missing")
            return path
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(spec.source, d["weight_name"], subfolder=d.get("subfolder") or None))
        except Exception as exc:
            raise ModelError(_load_failure(spec, exc)) from None

    def image_encoder(self, spec: ModelSpec, family: str):
        """(CLIPVisionModelWithProjection, CLIPImageProcessor) of an adapter, cached; None when
        the adapter reads no CLIP image (InstantID's face embeddings)."""
        folder = spec.defaults.get("image_encoder")
        if not folder:
            return None
        local = spec.local or Path(folder).is_dir()
        source, sub = (folder, None) if Path(folder).is_dir() else (spec.source, folder)
        key = f"image-encoder:{source}/{sub or ''}"
        with self.lane:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

            kwargs = {"subfolder": sub} if sub else {}
            try:
                encoder = CLIPVisionModelWithProjection.from_pretrained(
                    source,
                    dtype=self.dtype_for(family),
                    use_safetensors=True,
                    local_files_only=local,
                    **kwargs,
                )
                try:
                    processor = CLIPImageProcessor.from_pretrained(source, local_files_only=local, **kwargs)
                except OSError:  # no preprocessor_config.json: CLIP's own, at the encoder's size
                    side = encoder.config.image_size
                    processor = CLIPImageProcessor(size=side, crop_size=side)
            except (OSError, ValueError) as exc:
                raise ModelError(
                    f"the image encoder of IP-Adapter {spec.name!r} ({source}{'/' + sub if sub else ''}) "
                    f"could not be loaded: {_first_line(exc)}"
                ) from None
            encoder.to(self.device).eval()
            size = sum(t.numel() * t.element_size() for t in encoder.parameters())
            self._make_room(size)
            self._cache[key] = (encoder, processor)
            self._sizes[key] = size
            return encoder, processor

    def _ip_adapter_components(
        self, task: str, names: tuple[str, ...], family: str, model: str, base, attn_processors
    ) -> dict:
        """The adapters' tensors, checked against the base UNet, and their one image encoder."""
        if not names:
            return {}
        if task not in IP_ADAPTER_TASKS:
            raise ModelError(f"IP-Adapters work with text-to-image, img2img and ControlNet runs, not {task}")
        if attn_processors is not None:
            raise ModelError("IP-Adapters and lent attention processors can't be combined in one run")
        unet = getattr(base, "unet", None)
        if unet is None or family not in ("sd", "sdxl"):
            raise ModelError(
                f"IP-Adapters are for SD 1.x / 2.x and SDXL models; {model} is {FAMILY_NAMES.get(family, family)}"
            )
        weights, encoders = [], []
        for name in names:
            spec = self.resolve_ip_adapter(name)
            if spec.family not in ("unknown", family):
                raise ModelError(
                    f"IP-Adapter {spec.name} is for {FAMILY_NAMES[spec.family]} models, "
                    f"but {model} is {FAMILY_NAMES[family]}"
                )
            w, spec = self.ip_adapter_weights(name)
            _check_ip_fits(w, unet, spec.name, model)
            weights.append(w)
            encoders.append(self.image_encoder(spec, family))
        if len({id(e) for e in encoders}) > 1:
            raise ModelError("these IP-Adapters read different image encoders; run them one at a time")
        components = {}
        if encoders[0] is not None:
            components = {"image_encoder": encoders[0][0], "feature_extractor": encoders[0][1]}
        return {"weights": weights, "components": components}

    def _apply_ip_adapters(self, pipe, weights: list[dict], names: tuple[str, ...]) -> None:
        n = len(weights)
        dtype = pipe.unet.dtype
        cast = [{g: {k: v.to(dtype) for k, v in w[g].items()} for g in w} for w in weights]
        try:
            pipe.load_ip_adapter(cast, subfolder=[""] * n, weight_name=[""] * n, image_encoder_folder=None)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise ModelError(
                f"IP-Adapter {', '.join(names)} could not be applied: {_first_line(exc)}"
            ) from None

    def _apply_embeddings(self, pipe, paths: tuple[str, ...]) -> None:
        try:
            for path in paths:
                pipe.load_textual_inversion(path)
        except (OSError, ValueError) as exc:
            pipe.unload_textual_inversion()
            raise ModelError(f"embedding {Path(path).name} could not be loaded: {_first_line(exc)}") from None

    @contextlib.contextmanager
    def training_copy(self, name: str) -> Iterator[object]:
        """A fresh float32 copy of model `name` on the device, to train, held on the lane.

        The cache is emptied first (training wants the memory); the copy is dropped after
        the block, so nothing the training did reaches the pipelines that generate."""
        import torch

        with self.lane:
            spec = self.resolve(name)
            if spec.kind != "pipeline":
                raise ModelError(f"{spec.name} is a {spec.kind}; train on a base model")
            self.clear()
            pipe = self._load(spec, dtype=torch.float32)
            family = spec.family if spec.family != "unknown" else family_of_pipe(pipe)
            if family != "sd":
                raise ModelError(f"the trainer takes SD 1.x / 2.x models; {spec.name} is {family}")
            pipe.to(self.device)
            pipe.set_progress_bar_config(disable=True)
            try:
                yield pipe
            finally:
                del pipe
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    def _apply_loras(self, pipe, family: str, loras: tuple[LoraRef, ...]) -> None:
        names, weights = [], []
        try:
            for i, lora in enumerate(loras):
                source, weight_name = self._lora_source(lora.source, family)
                adapter = f"lora_{i}"
                kwargs = {"weight_name": weight_name} if weight_name else {}
                pipe.load_lora_weights(source, adapter_name=adapter, **kwargs)
                names.append(adapter)
                weights.append(lora.weight)
            pipe.set_adapters(names, weights)
        except ModelError:
            pipe.unload_lora_weights()
            raise
        except Exception as exc:
            pipe.unload_lora_weights()
            raise ModelError(f"LoRA {lora.source!r} could not be applied: {_first_line(exc)}") from None

    def _lora_source(self, source: str, family: str) -> tuple[str, str | None]:
        if source in self.catalog:
            spec = self.catalog[source]
            if spec.kind != "lora":
                raise ModelError(f"{source} is a base model, not a LoRA")
            if spec.family != family:
                raise ModelError(f"LoRA {source} is for {spec.family} models, not {family}")
            return spec.source, None
        refuse_pickle(source)
        path = Path(source).expanduser()
        if path.is_file():
            if path.suffix != ".safetensors":
                raise ModelError(f"LoRA {path.name} is not a .safetensors file")
            return str(path.parent), path.name
        if path.is_dir():
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise ModelError(f"LoRA folder {path} has no .safetensors file")
            return str(path), files[0].name
        if _looks_like_hub_id(source):
            return source, None
        raise ModelError(f"LoRA {source!r} not found: give a catalog name, a .safetensors file or a folder")


def _is_ip_adapter_file(path: Path) -> bool:
    keys = safetensors_keys(path)
    return any(k.startswith("image_proj.") for k in keys) and any(k.startswith("ip_adapter.") for k in keys)


def _check_ip_fits(weights: dict, unet, name: str, model: str) -> None:
    """An adapter's W'_k must read the UNet's cross-attention width, one pair per attn2 layer."""
    keys = sorted(k for k in weights["ip_adapter"] if k.endswith("to_k_ip.weight"))
    layers = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    width = weights["ip_adapter"][keys[0]].shape[1] if keys else None
    if width != unet.config.cross_attention_dim or len(keys) != len(layers):
        raise ModelError(
            f"IP-Adapter {name} was made for another base model (cross-attention width {width}, {len(keys)} layers; "
            f"{model} has {unet.config.cross_attention_dim}, {len(layers)}): pick an adapter for this model"
        )


def _ip_state(unet) -> tuple:
    """What load_ip_adapter changes on a UNet: its processors, image projection and hid-dim type."""
    return dict(unet.attn_processors), unet.encoder_hid_proj, unet.config.encoder_hid_dim_type


def _restore_ip_state(unet, state: tuple) -> None:
    processors, projection, kind = state
    unet.encoder_hid_proj = projection  # first: a Resampler projection has attention layers of its own
    unet.config.encoder_hid_dim_type = kind
    unet.set_attn_processor(processors)


def _check_task(spec: ModelSpec, pipe, task: str) -> None:
    """InstructPix2Pix UNets take 8 input channels (noisy latent + image latent); others 4."""
    unet = getattr(pipe, "unet", None)
    if unet is None:
        if task == "ip2p":
            raise ModelError(f"{spec.name} is not an InstructPix2Pix model (it has no UNet)")
        return
    channels = unet.config.in_channels
    if task == "ip2p" and channels != 8:
        raise ModelError(
            f"{spec.name} is not an InstructPix2Pix model: its UNet takes {channels} input channels, "
            "InstructPix2Pix needs 8 (the noisy latent and the input image's latent)"
        )
    if task != "ip2p" and channels == 8:
        raise ModelError(f"{spec.name} is an InstructPix2Pix model: use it for instruction editing (ip2p)")


FAMILY_NAMES = {
    "sd": "SD 1.x / 2.x",
    "sdxl": "SDXL",
    "sd3": "SD3",
    "flux": "FLUX",
    "sdxl-refiner": "SDXL refiner",
}


def control_of_config(config, class_name: str) -> tuple[str, str]:
    """(kind, family) of a ControlNet / T2I-Adapter from its config: SDXL ones take SDXL's
    added time embedding (ControlNet) or are the XL adapter."""
    kind = CONTROL_CLASSES.get(class_name)
    if kind is None:
        raise ModelError(f"{class_name} is not a ControlNet or T2I-Adapter the studio runs")
    if kind == "controlnet":
        return kind, "sdxl" if config.get("addition_embed_type") == "text_time" else "sd"
    return kind, "sdxl" if config.get("adapter_type") == "full_adapter_xl" else "sd"


def control_of_folder(folder: Path) -> tuple[str, str]:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelError(f"{folder} is not a ControlNet or T2I-Adapter folder (it has no config.json)")
    config = json.loads(path.read_text())
    return control_of_config(config, config.get("_class_name", ""))


def family_of_control_file(path: Path) -> str:
    """An original-format ControlNet checkpoint's family from its tensor names (header only)."""
    keys = tensor_names(path)
    if not any("input_hint_block" in k or "controlnet_cond_embedding" in k for k in keys):
        raise ModelError(f"{path.name} is not a ControlNet checkpoint")
    return "sdxl" if any("label_emb" in k or "add_embedding" in k for k in keys) else "sd"


def family_of_pipe(pipe) -> str:
    name = type(pipe).__name__
    if name not in CLASS_FAMILY:
        raise ModelError(f"{name} pipelines are not supported")
    return CLASS_FAMILY[name]


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(p and all(c.isalnum() or c in "-_." for c in p) for p in parts)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _load_failure(spec: ModelSpec, exc: Exception) -> str:
    if spec.local:
        return f"model {spec.name!r} at {spec.source} could not be loaded: {_first_line(exc)}"
    if Path(spec.source).is_relative_to(REPO_ROOT / "assets" / "models"):
        return (
            f"the toy model {spec.name!r} is not in this checkout ({spec.source} is missing); "
            "train it with `python -m studio.toyworld.train`"
        )
    return (
        f"model {spec.name!r} ({spec.source}) is not in the local Hugging Face cache and the Hub "
        f"could not be reached ({_first_line(exc)}). Download it on a connected machine "
        f"(`hf download {spec.source}`) and copy the cache over, or give a local folder."
    )
