"""The IP-Adapter tab: image prompts (IP-Adapter, up to MAX_ADAPTERS at once) and InstantID,
`Studio.ip_adapter` / `Studio.instantid` on the GPU lane.

Each adapter unit takes one or more reference pictures, a scale λ (0: the base model) and,
optionally, a mask (white where the adapter acts). The references (and masks) of a run are
stored in the gallery (techniques "reference" and "ip mask") and its images are the first
reference's children; restored settings bring the stored references back into their unit.
InstantID (SDXL) takes a face picture; its face and keypoint map are shown with the images.

API (hidden buttons, for gradio_client):
- `/ip_adapter(references, masks, settings)`: `references` a list of files, every reference of
  every unit in order (or only those of units without stored `reference_ids`); `masks` one
  file per masked unit (or None); `settings` a settings dict with `units`. Returns
  `[image paths + references + masks]` and `{"ids", "seeds", "duration_s", "settings", "notes",
  "reference_ids", "mask_ids"}`.
- `/instantid(face, settings)`: a face picture file and a settings dict; returns
  `[image paths + face + keypoint map]` and `{"ids", "seeds", "duration_s", "settings", "face_id"}`.

Run it alone with `python -m tabs.ip_adapter`.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from studio.gallery import GalleryError
from studio.instantid import InstantIDSettings
from studio.ip_adapter import MAX_ADAPTERS, MAX_REFERENCES, IPAdapterSettings, IPAdapterUnit
from studio.models import IP_ADAPTER_KIND, ModelError
from studio.schedulers import scheduler_names
from studio.settings import SettingsError
from studio.txt2img import model_defaults

from .common import (
    GPU_LANE,
    Bus,
    SessionRuns,
    api_only,
    on_gpu,
    on_message,
    share_link,
    user_errors,
    user_errors_gen,
    whole,
)
from .editing import _existing, _upload_path
from .txt2img import MODEL_DEFAULT, format_loras, parse_loras

SUPPORTED_FAMILIES = ("sd", "sdxl")


@dataclass
class Unit:
    panel: gr.Accordion
    enabled: gr.Checkbox
    adapter: gr.Dropdown
    scale: gr.Slider
    references: gr.File
    mask: gr.Image
    reference_ids: gr.State
    mask_id: gr.State

    def components(self) -> list:
        return [self.panel, self.enabled, self.adapter, self.scale, self.references, self.mask]


@dataclass
class IPAdapterTab:
    fields: dict
    units: list[Unit]
    generate: gr.Button
    images: gr.Gallery
    info: gr.Markdown


def _files(value) -> list[str]:
    """Paths of a File component's unprocessed value (a FileData dict, a list of them, or paths)."""
    if not value:
        return []
    items = value if isinstance(value, list) else [value]
    return [p for p in (_upload_path(v) for v in items) if p]


def build(studio, bus: Bus) -> IPAdapterTab:
    models = studio.models
    runs = SessionRuns(studio)
    base_models = [s.name for s in models.pipelines() if s.family in SUPPORTED_FAMILIES]
    adapters = [s.name for s in models.catalog.values() if s.kind == IP_ADAPTER_KIND]
    sdxl_models = [s.name for s in models.pipelines() if s.family == "sdxl"]

    def defaults(name: str) -> dict:
        try:
            return model_defaults(models.resolve(name))
        except ModelError:
            return {"steps": 25, "guidance": 7.0, "width": None, "height": None}

    default = studio.default_model
    first = (
        default if (default in base_models or default not in models.catalog) else (base_models or [None])[0]
    )
    start = defaults(first) if first else defaults("")

    # ---- layout ----------------------------------------------------------------------------

    units: list[Unit] = []
    with gr.Row():
        with gr.Column(scale=3):
            model = gr.Dropdown(
                base_models,
                value=first,
                label="Base model (SD 1.x / 2.x, SDXL)",
                allow_custom_value=True,
                info="A catalog name, a local diffusers folder, a .safetensors file or a hub id",
                elem_id="ipa-model",
            )
            prompt = gr.Textbox(
                label="Prompt", lines=2, placeholder="a shape on the left", elem_id="ipa-prompt"
            )
            negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="ipa-negative")
            for i in range(1, MAX_ADAPTERS + 1):
                with gr.Accordion(f"IP-Adapter {i}", open=i == 1, elem_id=f"ipa-unit{i}") as panel:
                    enabled = gr.Checkbox(value=i == 1, label="Enabled", elem_id=f"ipa-unit{i}-enabled")
                    adapter = gr.Dropdown(
                        adapters,
                        value=adapters[0] if adapters else None,
                        label="Adapter",
                        allow_custom_value=True,
                        info="A catalog name, a folder, a .safetensors file or a hub file (org/repo/file)",
                        elem_id=f"ipa-unit{i}-adapter",
                    )
                    scale = gr.Slider(
                        0,
                        2,
                        value=1.0,
                        step=0.05,
                        label="Scale λ (0: the prompt alone)",
                        elem_id=f"ipa-unit{i}-scale",
                    )
                    with gr.Row():
                        references = gr.File(
                            label=f"Reference pictures (1 to {MAX_REFERENCES}: their tokens share one attention)",
                            file_count="multiple",
                            file_types=["image"],
                            type="filepath",
                            height=160,
                            elem_id=f"ipa-unit{i}-references",
                        )
                        mask = gr.Image(
                            label="Mask (optional: white where this adapter acts)",
                            type="filepath",
                            format="png",
                            sources=["upload", "clipboard"],
                            height=160,
                            elem_id=f"ipa-unit{i}-mask",
                        )
                units.append(
                    Unit(panel, enabled, adapter, scale, references, mask, gr.State(()), gr.State(None))
                )
            with gr.Accordion("Sampling", open=False, elem_id="ipa-sampling"):
                with gr.Row():
                    steps = gr.Slider(
                        1, 150, value=start["steps"], step=1, label="Steps", elem_id="ipa-steps"
                    )
                    guidance = gr.Slider(0, 30, value=start["guidance"], step=0.5, label="Guidance (CFG)")
                with gr.Row():
                    scheduler = gr.Dropdown(
                        [MODEL_DEFAULT] + scheduler_names(), value=MODEL_DEFAULT, label="Sampler"
                    )
                    seed = gr.Number(value=-1, precision=0, label="Seed (-1: random)", elem_id="ipa-seed")
                with gr.Row():
                    width = gr.Number(value=0, precision=0, label="Width (0: the model's)")
                    height = gr.Number(value=0, precision=0, label="Height (0: the model's)")
                    batch_size = gr.Slider(1, 8, value=1, step=1, label="Batch size")
                loras = gr.Textbox(label="LoRA stack", lines=2, placeholder="/path/to/lora.safetensors:0.8")
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id="ipa-generate")
                stop = gr.Button("Stop", variant="stop", elem_id="ipa-stop")
            with gr.Accordion("InstantID (SDXL): a face's identity", open=False, elem_id="ipa-instantid"):
                gr.Markdown(
                    "Needs `models/instantid/` with `antelopev2/`, `ControlNetModel/` and `ip-adapter.safetensors` "
                    "(convert the published `ip-adapter.bin` once with `python -m studio convert-ip-adapter`); "
                    "a missing file is named when you generate. Uses the prompt and sampling settings above."
                )
                with gr.Row():
                    face = gr.Image(
                        label="Face picture",
                        type="filepath",
                        format="png",
                        sources=["upload", "clipboard"],
                        height=200,
                        elem_id="ipa-face",
                    )
                    with gr.Column():
                        face_model = gr.Dropdown(
                            sdxl_models,
                            value=sdxl_models[0] if sdxl_models else None,
                            label="SDXL model",
                            allow_custom_value=True,
                            elem_id="ipa-face-model",
                        )
                        identity_scale = gr.Slider(0, 2, value=0.8, step=0.05, label="Identity scale")
                        keypoint_scale = gr.Slider(
                            0, 2, value=0.8, step=0.05, label="Keypoint (IdentityNet) scale"
                        )
                instantid_button = gr.Button("Generate with InstantID", elem_id="ipa-instantid-generate")
        with gr.Column(scale=2):
            preview = gr.Image(label="Preview", type="pil", interactive=False, height=160)
            images = gr.Gallery(
                label="Results, then the references", format="png", columns=2, elem_id="ipa-images"
            )
            info = gr.Markdown(elem_id="ipa-info")
            with gr.Row():
                link_button = gr.Button("Copy share link", size="sm")
                link = gr.Textbox(label="Share link", buttons=["copy"], interactive=False, elem_id="ipa-link")

    fields = {
        "model": model,
        "prompt": prompt,
        "negative_prompt": negative,
        "steps": steps,
        "guidance": guidance,
        "scheduler": scheduler,
        "seed": seed,
        "width": width,
        "height": height,
        "batch_size": batch_size,
        "loras": loras,
    }
    unit_inputs = {
        c
        for u in units
        for c in (u.enabled, u.adapter, u.scale, u.references, u.mask, u.reference_ids, u.mask_id)
    }
    run_inputs = set(fields.values()) | unit_inputs
    form_outputs = [
        *fields.values(),
        *(c for u in units for c in (*u.components(), u.reference_ids, u.mask_id)),
    ]

    # ---- widgets <-> settings ------------------------------------------------------------

    def common(data: dict) -> dict:
        v = {name: data[component] for name, component in fields.items()}
        seed_value = whole("seed", v["seed"])
        return dict(
            prompt=v["prompt"] or "",
            negative_prompt=v["negative_prompt"] or "",
            steps=whole("steps", v["steps"]),
            guidance=None if v["guidance"] is None else float(v["guidance"]),
            scheduler=None if v["scheduler"] in (None, MODEL_DEFAULT) else v["scheduler"],
            seed=None if seed_value is None or seed_value < 0 else seed_value,
            width=whole("width", v["width"]) or None,
            height=whole("height", v["height"]) or None,
            batch_size=whole("batch size", v["batch_size"]) or 1,
            loras=parse_loras(v["loras"]),
        )

    def to_settings(data: dict) -> tuple[IPAdapterSettings, list[str], list[str]]:
        """The settings, the reference files of the enabled units in order, and their masks."""
        chosen, references, masks = [], [], []
        for i, unit in enumerate(units, 1):
            if not data[unit.enabled]:
                continue
            files = _files(data[unit.references])
            if not files:
                raise SettingsError(f"IP-Adapter {i} has no reference picture: upload one")
            if len(files) > MAX_REFERENCES:
                raise SettingsError(
                    f"IP-Adapter {i}: at most {MAX_REFERENCES} reference pictures, not {len(files)}"
                )
            mask = _upload_path(data[unit.mask])
            ids = tuple(data[unit.reference_ids] or ())
            chosen.append(
                IPAdapterUnit(
                    adapter=(data[unit.adapter] or "").strip(),
                    scale=float(data[unit.scale]),
                    references=len(files),
                    reference_ids=ids if len(ids) == len(files) else (),
                    masked=mask is not None,
                    mask_id=data[unit.mask_id] if mask is not None else None,
                )
            )
            references += files
            masks += [mask] if mask else []
        if not chosen:
            raise SettingsError("enable at least one IP-Adapter")
        settings = IPAdapterSettings(model=data[model] or "", units=tuple(chosen), **common(data))
        return settings, references, masks

    def to_form(s: IPAdapterSettings) -> dict:
        d = defaults(s.model)
        form = {
            model: s.model,
            prompt: s.prompt,
            negative: s.negative_prompt,
            steps: s.steps or d["steps"],
            guidance: s.guidance if s.guidance is not None else d["guidance"],
            scheduler: s.scheduler or MODEL_DEFAULT,
            seed: -1 if s.seed is None else s.seed,
            width: s.width or 0,
            height: s.height or 0,
            batch_size: s.batch_size,
            loras: format_loras(s.loras),
        }
        for i, unit in enumerate(units):
            u = s.units[i] if i < len(s.units) else None
            form.update({unit.enabled: u is not None, unit.panel: gr.Accordion(open=u is not None)})
            if u is None:
                form.update(
                    {unit.references: None, unit.mask: None, unit.reference_ids: (), unit.mask_id: None}
                )
                continue
            paths = [stored_path(r) for r in u.reference_ids]
            mask_path = stored_path(u.mask_id) if u.mask_id is not None else None
            form.update(
                {
                    unit.adapter: u.adapter,
                    unit.scale: u.scale,
                    unit.references: [p for p in paths if p] or None,
                    unit.reference_ids: u.reference_ids if all(paths) else (),
                    unit.mask: mask_path,
                    unit.mask_id: u.mask_id if mask_path else None,
                }
            )
        return form

    def stored_path(item_id) -> str | None:
        try:
            item = studio.gallery.get(item_id)
        except (ValueError, TypeError, GalleryError):
            item = None
        if item is None or not _existing(item.image_path):
            gr.Warning(f"Gallery picture #{item_id} is no longer there: upload it again.")
            return None
        return item.image_path

    # ---- events ----------------------------------------------------------------------------

    @user_errors
    def show_defaults(name):
        d = model_defaults(models.resolve(name))
        return {steps: d["steps"], guidance: d["guidance"], scheduler: MODEL_DEFAULT}

    @on_gpu
    @user_errors_gen
    def run_ip_adapter(data: dict, request: gr.Request, progress=gr.Progress()):
        settings, references, masks = to_settings(data)

        def job(on_step):
            return studio.ip_adapter(settings, references, masks, on_step=on_step)

        enabled = [unit for unit in units if data[unit.enabled]]
        for kind, payload in runs.stream(request, progress, settings.model, job):
            if kind == "preview":
                yield {preview: payload}
            elif kind == "cancelled":
                yield {info: "Cancelled: nothing was stored.", preview: None}
            else:
                result, items = payload
                update = {images: gallery_value(result, items), info: describe(result, items), preview: None}
                for unit, u in zip(enabled, result.settings.units, strict=True):
                    update[unit.reference_ids] = u.reference_ids
                    update[unit.mask_id] = u.mask_id
                yield update
                return

    def gallery_value(result, items) -> list:
        if items:
            value = [(item.image_path, f"seed {item.seed}") for item in items]
        else:
            value = [(img, f"seed {s}") for img, s in zip(result.images, result.seeds, strict=False)]
        return value + [(figure, name) for name, figure in result.figures.items()]

    def describe(result, items) -> str:
        s = result.settings
        parts = [
            f"**{len(result.images)} image(s)** · {s.technique.replace('_', '-')}",
            f"model `{s.model}`",
            f"{s.scheduler} · {s.steps} steps · guidance {s.guidance:g}",
            f"{s.width}×{s.height}",
            f"seeds {', '.join(map(str, result.seeds))}",
            f"{result.duration_s:.2f} s",
        ]
        if items:
            parts.append(f"gallery ids {', '.join(str(i.id) for i in items)}")
            if items[0].parent_id is not None:
                parts.append(f"child of #{items[0].parent_id}")
        else:
            parts.append("nothing was stored")
        lines = []
        for i, u in enumerate(getattr(s, "units", ()), 1):
            ids = ", ".join(f"#{r}" for r in u.reference_ids)
            mask = f" · mask #{u.mask_id}" if u.mask_id else ""
            lines.append(
                f"- adapter {i}: `{u.adapter}` · λ {u.scale:g} · {u.references} reference(s) {ids}{mask}"
            )
        lines += [f"- {note}" for note in result.notes]
        return " · ".join(parts) + "\n\n" + "\n".join(lines)

    def instantid_settings(data: dict) -> tuple[InstantIDSettings, str | None]:
        settings = InstantIDSettings(
            model=data[face_model] or "",
            identity_scale=float(data[identity_scale]),
            keypoint_scale=float(data[keypoint_scale]),
            **common(data),
        )
        return settings, _upload_path(data[face])

    @on_gpu
    @user_errors_gen
    def run_instantid(data: dict, request: gr.Request, progress=gr.Progress()):
        settings, face_path = instantid_settings(data)
        if face_path is None:
            raise SettingsError("upload a face picture for InstantID first")

        def job(on_step):
            return studio.instantid(settings, face_path, on_step=on_step)

        for kind, payload in runs.stream(request, progress, settings.model, job):
            if kind == "preview":
                yield {preview: payload}
            elif kind == "cancelled":
                yield {info: "Cancelled: nothing was stored.", preview: None}
            else:
                result, items = payload
                yield {images: gallery_value(result, items), info: describe(result, items), preview: None}
                return

    @user_errors
    def make_link(data: dict, request: gr.Request):
        return share_link(request, to_settings(data)[0])

    def from_bus(message):
        if not message or message.get("target") != "ip_adapter":
            return gr.skip()
        data = message.get("settings")
        if not data:  # "Send to IP-Adapter": the gallery picture becomes unit 1's reference
            path = stored_path(message.get("image_id"))
            if path is None:
                return gr.skip()
            unit = units[0]
            return {
                unit.enabled: True,
                unit.panel: gr.Accordion(open=True),
                unit.references: [path],
                unit.reference_ids: (),
            }
        if not isinstance(data, dict) or data.get("technique") != IPAdapterSettings.technique:
            return gr.skip()
        try:
            return to_form(IPAdapterSettings.from_dict(data))
        except SettingsError as exc:
            gr.Warning(f"Those settings could not be restored: {exc}")
            return gr.skip()

    @on_gpu
    @user_errors
    def api_ip_adapter(references, masks, settings: dict):
        s = IPAdapterSettings.from_dict(settings)
        result, items = studio.ip_adapter(s, list(references or []), list(masks or []))
        pictures = [item.image_path for item in items] or list(result.images)
        return pictures + list(result.figures.values()), {
            "ids": [item.id for item in items],
            "seeds": result.seeds,
            "duration_s": result.duration_s,
            "settings": [item.settings for item in items],
            "notes": list(result.notes),
            "reference_ids": [list(u.reference_ids) for u in result.settings.units],
            "mask_ids": [u.mask_id for u in result.settings.units],
        }

    @on_gpu
    @user_errors
    def api_instantid(face_file, settings: dict):
        if not face_file:
            raise SettingsError("give a face picture")
        result, items = studio.instantid(InstantIDSettings.from_dict(settings), face_file)
        pictures = [item.image_path for item in items] or list(result.images)
        return pictures + list(result.figures.values()), {
            "ids": [item.id for item in items],
            "seeds": result.seeds,
            "duration_s": result.duration_s,
            "settings": [item.settings for item in items],
            "face_id": result.settings.face_id,
        }

    # ---- wiring ----------------------------------------------------------------------------

    private = {"api_visibility": "private"}
    model.input(show_defaults, model, [steps, guidance, scheduler], **private)
    for unit in units:  # a new upload is not the stored picture any more
        unit.references.upload(lambda: (), None, unit.reference_ids, queue=False, **private)
        unit.references.clear(lambda: (), None, unit.reference_ids, queue=False, **private)
        unit.mask.upload(lambda: None, None, unit.mask_id, queue=False, **private)
        unit.mask.clear(lambda: None, None, unit.mask_id, queue=False, **private)
    gr.on(
        [generate.click, prompt.submit],
        run_ip_adapter,
        run_inputs,
        [preview, images, info, *(c for u in units for c in (u.reference_ids, u.mask_id))],
        concurrency_id=GPU_LANE,
        concurrency_limit=1,
        preprocess=False,  # the pictures reach the studio's reader as files, which names a bad one
        **private,
    )
    instantid_button.click(
        run_instantid,
        set(fields.values()) | {face, face_model, identity_scale, keypoint_scale},
        [preview, images, info],
        concurrency_id=GPU_LANE,
        concurrency_limit=1,
        preprocess=False,
        **private,
    )
    stop.click(runs.cancel, None, None, queue=False, **private)
    link_button.click(make_link, run_inputs, link, preprocess=False, **private)
    on_message(bus, from_bus, form_outputs)

    api_only(api_ip_adapter, "ip_adapter", files=("many", "many"))
    api_only(api_instantid, "instantid", files=("one",))
    return IPAdapterTab(fields=fields, units=units, generate=generate, images=images, info=info)


def main() -> None:
    from .launch import run_alone

    run_alone(build, "IP-Adapter")


if __name__ == "__main__":
    main()
