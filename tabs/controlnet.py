"""The ControlNet tab: text-to-image that follows up to MAX_UNITS structure maps (ControlNets or
T2I-Adapters), `Studio.controlnet` on the GPU lane.

Each unit takes a picture and a preprocessor (canny, segmentation, ...) that turns it into
the map its ControlNet reads, or a map as it is. "Preview map" runs the preprocessor on the
picture, fitted to the image size as the run fits it, and shows the map in the unit's map
box, where it can be painted on; a map in that box is used as it is (preprocessor "none"),
so the user's edit wins. An empty map box means: preprocess the picture at generation. A
gallery map ("Send to ControlNet" on a "control map" item, or restored settings naming one)
goes into the map box with its gallery id, so that running on it stores nothing new.

The maps of a run are stored (technique "control map") and its images are the first map's
children; the output gallery shows the images, then the maps.

API (a hidden button, for gradio_client): `/controlnet(files, settings)`, `files` a list of
files (`[handle_file(path), ...]`: one per unit, or one per unit without a stored map
`map_id`, in order; None or [] when every unit names one), `settings` a settings dict with
`units`; returns `[image paths +
control maps]` and `{"ids", "seeds", "duration_s", "settings", "notes", "map_ids"}`.

Run it alone with `python -m tabs.controlnet`.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import gradio as gr
from PIL import Image

from studio.controlnet import MAX_UNITS, ControlNetSettings, ControlUnit, catalog_thresholds
from studio.controlnet import preview_map as preview_control_map
from studio.gallery import GalleryError
from studio.images import open_image
from studio.models import CONTROL_KINDS, ModelError
from studio.preprocessors import PREPROCESSORS, Threshold
from studio.preprocessors import get as get_preprocessor
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
    user_errors,
    user_errors_gen,
    whole,
)
from .editing import _existing, _upload_path
from .sharing import sharing_rows
from .txt2img import MODEL_DEFAULT, format_loras, parse_loras

SUPPORTED_FAMILIES = ("sd", "sdxl")
DEFAULT_CONTROLS = ("toy-sd-controlnet-canny", "toy-sd-controlnet-seg")  # unit 1, unit 2 and on
MAP_TECHNIQUE = "control map"  # the gallery technique of a stored map
UNITS = MAX_UNITS  # as many panels as a run takes: restored settings never lose a unit

# Emptying a map box from the server (value None) leaves gradio's image editor pending for
# good when the editor is also an event's input (gradio 6.x). So the server names the boxes
# to empty (`clear_maps`, a hidden JSON) and the browser presses each one's own "Clear canvas"
# button, which empties it and fires its clear event. A box in a closed accordion is not in
# the page: its button is pressed when it appears, within two seconds (restoring settings
# opens the accordions of the units it enables).
CLEAR_MAPS_JS = """(message) => {
    const clear = (i, tries) => {
        const button = document.querySelector(`#cn-unit${i}-map button[aria-label="Clear canvas"]`);
        if (button) button.click();
        else if (tries > 0) setTimeout(() => clear(i, tries - 1), 100);
    };
    for (const i of (message || {}).units || []) clear(i, 20);
}"""


@dataclass
class Unit:
    """One unit's widgets."""

    panel: gr.Accordion
    enabled: gr.Checkbox
    model: gr.Dropdown
    image: gr.Image  # the picture the preprocessor reads
    preprocessor: gr.Dropdown
    resolution: gr.Number
    threshold_a: gr.Slider
    threshold_b: gr.Slider
    scale: gr.Slider
    start: gr.Slider
    end: gr.Slider
    preview: gr.Button
    map: gr.ImageEditor  # the map used as it is, when it holds one
    map_id: gr.State  # the gallery item the map box holds, when it is one

    def settings_components(self) -> list:
        return [
            self.enabled,
            self.model,
            self.preprocessor,
            self.resolution,
            self.threshold_a,
            self.threshold_b,
            self.scale,
            self.start,
            self.end,
            self.map_id,
        ]

    def form_components(self) -> list:
        """What restoring settings sets."""
        return [self.panel, *self.settings_components(), self.map]


@dataclass
class ControlNetTab:
    fields: dict  # settings field name -> component (the units apart)
    units: list[Unit]
    generate: gr.Button
    images: gr.Gallery
    info: gr.Markdown


_clears = itertools.count(1)


def clear_message(numbers: list[int]) -> dict:
    """The `clear_maps` value that empties those units' map boxes (the nonce makes it a change)."""
    return {"units": numbers, "nonce": next(_clears)}


def threshold_options(threshold: Threshold | None, value=None) -> dict:
    """A threshold slider's range, step, value, label and visibility for a preprocessor's
    Threshold (hidden when the preprocessor has none)."""
    if threshold is None:
        return {"visible": False}
    whole = all(float(x).is_integer() for x in (threshold.lo, threshold.hi, threshold.default))
    return {
        "minimum": threshold.lo,
        "maximum": threshold.hi,
        "step": 1 if whole else 0.01,
        "value": threshold.default if value is None else value,
        "label": threshold.label,
        "visible": True,
    }


def threshold_slider(threshold: Threshold | None, value=None) -> gr.Slider:
    """The update of a threshold slider for a newly chosen preprocessor."""
    return gr.Slider(**threshold_options(threshold, value))


def map_file(image: Image.Image) -> str:
    """`image` as a PNG file named by its content, for a map to show.

    Shown as a file, not as a PIL image: gradio writes a PIL output into its cache in place, at
    a path named by its pixels, so showing the same map again (the preview, then the results)
    would rewrite the file the map box may be reading at that moment. A file is copied into
    the cache once, atomically."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    folder = Path(tempfile.gettempdir()) / "latent-studio-maps"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(data).hexdigest()[:32]}.png"
    if not path.is_file():
        fd, staging = tempfile.mkstemp(dir=folder, prefix=".map-", suffix=".png")
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(staging, path)
    return str(path)


def _editor_map(editor: gr.ImageEditor, value) -> Image.Image | None:
    """The map in a map box, from the editor's unprocessed value (the composite: the map as painted)."""
    if not value:
        return None
    from gradio.components.image_editor import EditorData

    data = editor.preprocess(EditorData.model_validate(value))
    if not data:
        return None
    return data.get("composite") or data.get("background")


def build(studio, bus: Bus) -> ControlNetTab:
    models = studio.models
    runs = SessionRuns(studio)
    base_models = [s.name for s in models.pipelines() if s.family in SUPPORTED_FAMILIES]
    controls = [s.name for s in models.catalog.values() if s.kind in CONTROL_KINDS]
    preprocessor_choices = [(p.label, name) for name, p in PREPROCESSORS.items()]

    def defaults(name: str) -> dict:
        try:
            return model_defaults(models.resolve(name))
        except ModelError:
            return {"steps": 25, "guidance": 7.0, "width": None, "height": None}

    def control_preprocessor(name: str) -> str | None:
        spec = models.catalog.get((name or "").strip())
        if spec is None or spec.kind not in CONTROL_KINDS:
            return None
        p = spec.defaults.get("preprocessor")
        return p if p in PREPROCESSORS else None

    def control_thresholds(name: str, preprocessor: str) -> tuple:
        """The thresholds a catalog ControlNet's maps were made with (None: the preprocessor's)."""
        unit = catalog_thresholds(models, ControlUnit(model=name or "", preprocessor=preprocessor))
        return unit.threshold_a, unit.threshold_b

    start = defaults(studio.default_model)
    # the studio's model (a catalog SD / SDXL name, or a folder or file of its own), else the first
    default = studio.default_model
    usable = default in base_models or default not in models.catalog
    first = default if usable else (base_models or [None])[0]

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
                elem_id="cn-model",
            )
            prompt = gr.Textbox(
                label="Prompt", lines=2, placeholder="a red circle on the left", elem_id="cn-prompt"
            )
            negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="cn-negative")
            for i in range(1, UNITS + 1):
                control = DEFAULT_CONTROLS[min(i, len(DEFAULT_CONTROLS)) - 1]
                control = control if control in controls else (controls or [None])[0]
                pre = control_preprocessor(control) or "none"
                p, (value_a, value_b) = PREPROCESSORS[pre], control_thresholds(control, pre)
                with gr.Accordion(f"Control unit {i}", open=i == 1, elem_id=f"cn-unit{i}") as panel:
                    enabled = gr.Checkbox(value=i == 1, label="Enabled", elem_id=f"cn-unit{i}-enabled")
                    unit_model = gr.Dropdown(
                        controls,
                        value=control,
                        label="ControlNet / T2I-Adapter",
                        allow_custom_value=True,
                        info="A catalog name, a local folder, a .safetensors file or a hub id",
                        elem_id=f"cn-unit{i}-model",
                    )
                    with gr.Row():
                        image = gr.Image(
                            label="Input picture",
                            type="filepath",
                            format="png",
                            image_mode=None,  # the core flattens transparency and reads EXIF
                            sources=["upload", "clipboard"],
                            height=220,
                            elem_id=f"cn-unit{i}-image",
                        )
                        unit_map = gr.ImageEditor(
                            label="Control map",
                            type="pil",
                            image_mode="RGB",
                            format="png",
                            sources=["upload", "clipboard"],
                            transforms=(),
                            layers=False,
                            brush=gr.Brush(colors=["#ffffff", "#000000", "#808080"], color_mode="defaults"),
                            height=220,
                            elem_id=f"cn-unit{i}-map",
                        )
                    gr.Markdown(
                        "A map in the map box is used as it is: paint on it to change it. With the box "
                        "empty, the picture goes through the preprocessor when you generate.",
                        elem_classes=["cn-hint"],
                    )
                    with gr.Row():
                        preprocessor = gr.Dropdown(
                            preprocessor_choices,
                            value=pre,
                            label="Preprocessor",
                            elem_id=f"cn-unit{i}-preprocessor",
                        )
                        resolution = gr.Number(
                            value=0,
                            precision=0,
                            label="Preprocessor resolution (0: the map's size)",
                            elem_id=f"cn-unit{i}-resolution",
                        )
                        preview_button = gr.Button("Preview map", size="sm", elem_id=f"cn-unit{i}-preview")
                    with gr.Row():
                        threshold_a = gr.Slider(
                            **{"minimum": 0, "maximum": 1, "value": 0, "label": "Threshold A"}
                            | threshold_options(p.a, value_a),
                            elem_id=f"cn-unit{i}-a",
                        )
                        threshold_b = gr.Slider(
                            **{"minimum": 0, "maximum": 1, "value": 0, "label": "Threshold B"}
                            | threshold_options(p.b, value_b),
                            elem_id=f"cn-unit{i}-b",
                        )
                    with gr.Row():
                        scale = gr.Slider(
                            0,
                            2,
                            value=1.0,
                            step=0.05,
                            label="Conditioning scale",
                            elem_id=f"cn-unit{i}-scale",
                        )
                        unit_start = gr.Slider(
                            0,
                            1,
                            value=0.0,
                            step=0.01,
                            label="Start",
                            info="share of the steps before it acts",
                            elem_id=f"cn-unit{i}-start",
                        )
                        unit_end = gr.Slider(
                            0,
                            1,
                            value=1.0,
                            step=0.01,
                            label="End",
                            info="share of the steps after which it stops",
                            elem_id=f"cn-unit{i}-end",
                        )
                map_id = gr.State(None)
                units.append(
                    Unit(
                        panel=panel,
                        enabled=enabled,
                        model=unit_model,
                        image=image,
                        preprocessor=preprocessor,
                        resolution=resolution,
                        threshold_a=threshold_a,
                        threshold_b=threshold_b,
                        scale=scale,
                        start=unit_start,
                        end=unit_end,
                        preview=preview_button,
                        map=unit_map,
                        map_id=map_id,
                    )
                )
            with gr.Accordion("Sampling", open=False, elem_id="cn-sampling"):
                with gr.Row():
                    steps = gr.Slider(1, 150, value=start["steps"], step=1, label="Steps", elem_id="cn-steps")
                    guidance = gr.Slider(0, 30, value=start["guidance"], step=0.5, label="Guidance (CFG)")
                with gr.Row():
                    scheduler = gr.Dropdown(
                        [MODEL_DEFAULT] + scheduler_names(), value=MODEL_DEFAULT, label="Sampler"
                    )
                    seed = gr.Number(value=-1, precision=0, label="Seed (-1: random)", elem_id="cn-seed")
                with gr.Row():
                    width = gr.Number(
                        value=0, precision=0, label="Width (0: the model's)", elem_id="cn-width"
                    )
                    height = gr.Number(
                        value=0, precision=0, label="Height (0: the model's)", elem_id="cn-height"
                    )
                with gr.Row():
                    batch_size = gr.Slider(1, 8, value=1, step=1, label="Batch size")
                    guess_mode = gr.Checkbox(
                        value=False,
                        label="Guess mode",
                        info="the ControlNet sees no prompt: the map alone drives it (ControlNets only)",
                    )
                loras = gr.Textbox(
                    label="LoRA stack",
                    lines=2,
                    placeholder="lcm-lora-sdv1-5:1.0  or  /path/to/lora.safetensors:0.8, one a line",
                )
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id="cn-generate")
                stop = gr.Button("Stop", variant="stop", elem_id="cn-stop")
        with gr.Column(scale=2):
            preview = gr.Image(label="Preview", type="pil", interactive=False, height=160)
            images = gr.Gallery(
                label="Results, then the control maps", format="png", columns=2, elem_id="cn-images"
            )
            info = gr.Markdown(elem_id="cn-info")
            sharing = sharing_rows((ControlNetSettings.technique,), "ControlNet", "my-controlnet", "cn")

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
        "guess_mode": guess_mode,
        "loras": loras,
    }
    settings_inputs = set(fields.values())
    for unit in units:
        settings_inputs |= set(unit.settings_components())
    run_inputs = settings_inputs | {c for unit in units for c in (unit.image, unit.map)}
    clear_maps = gr.JSON(visible=False, value=None)  # {"units": [numbers], "nonce"}: map boxes to empty
    form_outputs = [*fields.values(), *(c for unit in units for c in unit.form_components()), clear_maps]

    # ---- widgets <-> settings ------------------------------------------------------------

    def unit_settings(unit: Unit, data: dict) -> ControlUnit:
        name = data[unit.preprocessor] or "none"
        p = PREPROCESSORS.get(name)
        return ControlUnit(
            model=(data[unit.model] or "").strip(),
            scale=float(data[unit.scale]),
            start=float(data[unit.start]),
            end=float(data[unit.end]),
            preprocessor=name,
            resolution=whole("preprocessor resolution", data[unit.resolution]) or None,
            threshold_a=float(data[unit.threshold_a]) if p and p.a else None,
            threshold_b=float(data[unit.threshold_b]) if p and p.b else None,
            map_id=data[unit.map_id],
        )

    def to_settings(data: dict, run: bool = False) -> tuple[ControlNetSettings, list, list[bool]]:
        """The settings, each enabled unit's input (`run`: its map, or its picture's file) and
        whether the unit's map box is used."""
        v = {name: data[component] for name, component in fields.items()}
        seed_value = whole("seed", v["seed"])
        chosen, inputs, from_box = [], [], []
        for unit in units:
            if not data[unit.enabled]:
                continue
            u = unit_settings(unit, data)
            if run:
                drawn = _editor_map(unit.map, data[unit.map])
                if drawn is not None:
                    # the map box wins: the map as shown (and painted on), used as it is
                    u = replace(u, preprocessor="none", resolution=None, threshold_a=None, threshold_b=None)
                    inputs.append(drawn)
                else:
                    u = replace(u, map_id=None)  # an empty map box: the picture, preprocessed
                    inputs.append(_upload_path(data[unit.image]))
                from_box.append(drawn is not None)
            chosen.append(u)
        if not chosen:
            raise SettingsError("enable at least one control unit")
        settings = ControlNetSettings(
            model=v["model"] or "",
            prompt=v["prompt"] or "",
            negative_prompt=v["negative_prompt"] or "",
            steps=whole("steps", v["steps"]),
            guidance=None if v["guidance"] is None else float(v["guidance"]),
            scheduler=None if v["scheduler"] in (None, MODEL_DEFAULT) else v["scheduler"],
            seed=None if seed_value is None or seed_value < 0 else seed_value,
            width=whole("width", v["width"]) or None,
            height=whole("height", v["height"]) or None,
            batch_size=whole("batch size", v["batch_size"]) or 1,
            guess_mode=bool(v["guess_mode"]),
            loras=parse_loras(v["loras"]),
            units=tuple(chosen),
        )
        return settings, inputs, from_box

    def to_form(s: ControlNetSettings) -> dict:
        """Every widget of the settings; units past its own are disabled. A unit naming a stored
        map gets that map in its map box; the others' map boxes are emptied."""
        d = defaults(s.model)
        values = {
            "model": s.model,
            "prompt": s.prompt,
            "negative_prompt": s.negative_prompt,
            "steps": s.steps or d["steps"],
            "guidance": s.guidance if s.guidance is not None else d["guidance"],
            "scheduler": s.scheduler or MODEL_DEFAULT,
            "seed": -1 if s.seed is None else s.seed,
            "width": s.width or 0,
            "height": s.height or 0,
            "batch_size": s.batch_size,
            "guess_mode": s.guess_mode,
            "loras": format_loras(s.loras),
        }
        form = {fields[name]: value for name, value in values.items()}
        emptied = []
        if len(s.units) > len(units):
            gr.Warning(f"Only the first {len(units)} of the {len(s.units)} control units were restored.")
        for i, unit in enumerate(units):
            u = s.units[i] if i < len(s.units) else None
            form[unit.enabled] = u is not None
            form[unit.panel] = gr.Accordion(open=u is not None)
            form[unit.map_id] = None
            if u is None:
                continue
            p = PREPROCESSORS[u.preprocessor]
            form.update(
                {
                    unit.model: u.model,
                    unit.preprocessor: u.preprocessor,
                    unit.resolution: u.resolution or 0,
                    unit.threshold_a: threshold_slider(p.a, u.threshold_a),
                    unit.threshold_b: threshold_slider(p.b, u.threshold_b),
                    unit.scale: u.scale,
                    unit.start: u.start,
                    unit.end: u.end,
                }
            )
            if u.map_id is not None and (stored := stored_map(u.map_id)) is not None:
                form.update({unit.map: stored.image_path, unit.map_id: stored.id})
            else:
                emptied.append(i + 1)  # its picture is preprocessed: no map of before may win
        form[clear_maps] = clear_message(emptied)
        return form

    def stored_map(item_id):
        """Gallery item `item_id` (a map to load into a map box), or None with a warning."""
        try:
            item = studio.gallery.get(item_id)
        except (ValueError, TypeError, GalleryError):
            item = None
        if item is None or not _existing(item.image_path):
            gr.Warning(f"Gallery map #{item_id} is no longer there: give the unit a picture or a map again.")
            return None
        return item

    def send_values(item_id) -> dict:
        """A gallery image sent here: unit 1's map when it is a stored map, else its picture."""
        unit = units[0]
        try:
            item = studio.gallery.get(item_id) if item_id is not None else None
        except (ValueError, TypeError, GalleryError):
            item = None
        if item is None or not _existing(item.image_path):
            gr.Warning(f"Gallery image #{item_id} is no longer there.")
            return gr.skip()
        values = {unit.enabled: True, unit.panel: gr.Accordion(open=True)}
        if item.technique == MAP_TECHNIQUE:
            values.update({unit.map: item.image_path, unit.map_id: item.id})
        else:
            values.update({unit.image: item.image_path, unit.map_id: None, clear_maps: clear_message([1])})
        return values

    # ---- events ----------------------------------------------------------------------------

    @user_errors
    def show_defaults(name):
        d = model_defaults(models.resolve(name))
        return {steps: d["steps"], guidance: d["guidance"], scheduler: MODEL_DEFAULT}

    def unit_events(index: int, unit: Unit) -> None:
        def pick_control(name):
            """A catalog ControlNet brings its preprocessor (and that one's default thresholds)."""
            pre = control_preprocessor(name)
            if pre is None:
                return gr.skip()
            p, (a, b) = PREPROCESSORS[pre], control_thresholds(name, pre)
            return {
                unit.preprocessor: pre,
                unit.threshold_a: threshold_slider(p.a, a),
                unit.threshold_b: threshold_slider(p.b, b),
            }

        def pick_preprocessor(name):
            p = PREPROCESSORS.get(name)
            if p is None:
                return gr.skip()
            return {unit.threshold_a: threshold_slider(p.a), unit.threshold_b: threshold_slider(p.b)}

        @user_errors
        def preview_map(data: dict):
            path = _upload_path(data[unit.image])
            if path is None:
                raise SettingsError("give this unit a picture first (upload or paste one)")
            p = get_preprocessor(data[unit.preprocessor] or "none")
            control = ControlUnit(
                model="preview",  # the map doesn't depend on which ControlNet reads it
                preprocessor=p.name,
                resolution=whole("preprocessor resolution", data[unit.resolution]) or None,
                threshold_a=float(data[unit.threshold_a]) if p.a else None,
                threshold_b=float(data[unit.threshold_b]) if p.b else None,
            )
            control.check(index)
            w, h = whole("width", data[width]) or None, whole("height", data[height]) or None
            picture = preview_control_map(models, data[model], w, h, control, open_image(path))
            return {unit.map: map_file(picture), unit.map_id: None}

        def forget_map():
            # a new picture (or none): the map box's map was of another, so it is emptied
            return None, clear_message([index])

        def forget_map_id():
            return None  # a cleared map box holds no gallery map

        private = {"api_visibility": "private"}
        unit.model.input(
            pick_control, unit.model, [unit.preprocessor, unit.threshold_a, unit.threshold_b], **private
        )
        unit.preprocessor.input(
            pick_preprocessor, unit.preprocessor, [unit.threshold_a, unit.threshold_b], **private
        )
        unit.preview.click(
            preview_map,
            {
                unit.image,
                model,
                width,
                height,
                unit.preprocessor,
                unit.resolution,
                unit.threshold_a,
                unit.threshold_b,
            },
            [unit.map, unit.map_id],
            preprocess=False,  # an unreadable upload reaches the studio's reader, which names it
            **private,
        )
        gr.on(
            [unit.image.upload, unit.image.clear],
            forget_map,
            None,
            [unit.map_id, clear_maps],
            queue=False,
            **private,
        )
        # the map box says "upload" when it is given a picture by an event too: only its clear
        # button forgets the id (a map painted on or replaced is told apart by its pixels)
        unit.map.clear(forget_map_id, None, unit.map_id, queue=False, **private)

    @on_gpu
    @user_errors_gen
    def run_controlnet(data: dict, request: gr.Request, progress=gr.Progress()):
        settings, inputs, from_box = to_settings(data, run=True)

        def job(on_step):
            return studio.controlnet(settings, inputs, on_step=on_step)

        enabled = [unit for unit in units if data[unit.enabled]]
        for kind, payload in runs.stream(request, progress, settings.model, job):
            if kind == "preview":
                yield {preview: payload}
            elif kind == "cancelled":
                yield {info: "Cancelled: nothing was stored.", preview: None}
            else:
                result, items = payload
                update = {
                    images: gallery_value(result, items),
                    info: describe(result, items, from_box),
                    preview: None,
                }
                for unit, u, boxed in zip(enabled, result.settings.units, from_box, strict=True):
                    if boxed:  # the map box holds that stored map now: running again stores nothing new
                        update[unit.map_id] = u.map_id
                yield update
                return

    def gallery_value(result, items) -> list:
        if items:
            value = [(item.image_path, f"seed {item.seed}") for item in items]
        else:
            value = [(img, f"seed {s}") for img, s in zip(result.images, result.seeds, strict=False)]
        ids = [u.map_id for u in result.settings.units]
        for (name, figure), map_id in zip(result.figures.items(), ids, strict=False):
            value.append((map_file(figure), name + (f" · #{map_id}" if map_id is not None else "")))
        return value

    def describe(result, items, from_box) -> str:
        s = result.settings
        parts = [
            f"**{len(result.images)} image(s)** · ControlNet",
            f"model `{s.model}`",
            f"{s.scheduler} · {s.steps} steps · guidance {s.guidance:g}",
            f"{s.width}×{s.height}",
            f"seeds {', '.join(map(str, result.seeds))}",
            f"{result.duration_s:.2f} s",
        ]
        if s.guess_mode:
            parts.insert(2, "guess mode")
        if items:
            parts.append(f"gallery ids {', '.join(str(i.id) for i in items)}")
            if items[0].parent_id is not None:
                parts.append(f"child of map #{items[0].parent_id}")
        else:
            parts.append("nothing was stored")
        lines = []
        for i, (u, boxed) in enumerate(zip(s.units, from_box, strict=False), 1):
            source = "its map box" if boxed else f"{PREPROCESSORS[u.preprocessor].label} of its picture"
            stored = f" · map #{u.map_id}" if u.map_id is not None else ""
            lines.append(
                f"- unit {i}: `{u.model}` · {source} · scale {u.scale:g} · "
                f"steps {u.start:g}–{u.end:g}{stored}"
            )
        lines += [f"- {note}" for note in result.notes]
        return " · ".join(parts) + "\n\n" + "\n".join(lines)

    def from_bus(message):
        if not message or message.get("target") != "controlnet":
            return gr.skip()
        data = message.get("settings")
        if not data:  # "Send to ControlNet": the gallery image goes to unit 1
            return send_values(message.get("image_id"))
        if not isinstance(data, dict) or data.get("technique") != ControlNetSettings.technique:
            return gr.skip()
        try:
            return to_form(ControlNetSettings.from_dict(data))
        except SettingsError as exc:
            gr.Warning(f"Those settings could not be restored: {exc}")
            return gr.skip()

    @on_gpu
    @user_errors
    def api_controlnet(files, settings: dict):
        result, items = studio.controlnet(ControlNetSettings.from_dict(settings), list(files or []) or None)
        images_out = [item.image_path for item in items] or list(result.images)
        return images_out + list(result.figures.values()), {
            "ids": [item.id for item in items],
            "seeds": result.seeds,
            "duration_s": result.duration_s,
            "settings": [item.settings for item in items],
            "notes": list(result.notes),
            "map_ids": [u.map_id for u in result.settings.units],
        }

    # ---- wiring ----------------------------------------------------------------------------

    model.input(show_defaults, model, [steps, guidance, scheduler], api_visibility="private")
    for index, unit in enumerate(units, 1):
        unit_events(index, unit)
    clear_maps.change(None, clear_maps, None, js=CLEAR_MAPS_JS, queue=False, api_visibility="private")
    gr.on(
        [generate.click, prompt.submit],
        run_controlnet,
        run_inputs,
        [preview, images, info, *(unit.map_id for unit in units)],
        concurrency_id=GPU_LANE,
        concurrency_limit=1,
        api_visibility="private",
        preprocess=False,  # the pictures reach the studio's reader as files (see tabs/editing.py)
    )
    stop.click(runs.cancel, None, None, queue=False, api_visibility="private")
    sharing.wire(
        inputs=settings_inputs,
        outputs=form_outputs,
        settings_of=lambda data: to_settings(data)[0],
        to_form=to_form,
        # a preset is for any picture: it names no stored map
        for_preset=lambda s: s.replace(units=tuple(replace(u, map_id=None) for u in s.units)),
    )
    on_message(bus, from_bus, [*form_outputs, *(unit.image for unit in units)])

    api_only(api_controlnet, "controlnet", files=("many",))
    return ControlNetTab(fields=fields, units=units, generate=generate, images=images, info=info)


def main() -> None:
    from .launch import run_alone

    run_alone(build, "ControlNet")


if __name__ == "__main__":
    main()
