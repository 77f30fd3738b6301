"""The Editing tab: SDEdit and InstructPix2Pix on one input image, `Studio.sdedit` / `Studio.ip2p`
on the GPU lane.

The input is an upload (or a paste) or a gallery image sent here ("Send to editing",
"Restore settings"); a gallery image's id is remembered as the edit's `source_id`, so the
results become its children. An upload is stored by the service as an item of technique
"upload" (the results' parent) on the first run, and its id is remembered from then on, so
running again on the same picture doesn't store it twice. The service compares pixels: a
different picture than the remembered item is a new upload.

API (hidden buttons, for gradio_client): `/sdedit(image, settings)` and `/ip2p(image, settings)`,
`image` a file (`handle_file(path)`, or None to edit the gallery item `settings["source_id"]`),
`settings` a settings dict; both return `[image paths], {"ids", "seeds", "duration_s",
"settings", "notes", "parent_id"}`.

Run it alone with `python -m tabs.editing`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import gradio as gr

from studio.ip2p import DEFAULT_IMAGE_GUIDANCE, InstructPix2PixSettings
from studio.models import ModelError
from studio.schedulers import scheduler_names
from studio.sdedit import SDEditSettings
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
from .sharing import sharing_rows
from .txt2img import MODEL_DEFAULT, format_loras, parse_loras

SDEDIT = "SDEdit"
IP2P = "InstructPix2Pix"
MODES = {SDEDIT: "sdedit", IP2P: "ip2p"}  # radio label -> technique
LABELS = {technique: label for label, technique in MODES.items()}
IP2P_MODEL = "toy-instruct-pix2pix"
TECHNIQUES = tuple(MODES.values())


@dataclass
class EditingTab:
    fields: dict  # technique -> {settings field name -> component}
    mode: gr.Radio
    image: gr.Image
    source_id: gr.State
    generate: gr.Button
    images: gr.Gallery
    info: gr.Markdown
    compare: gr.ImageSlider


def _existing(path) -> bool:
    try:
        return bool(path) and os.path.isfile(path)
    except (OSError, ValueError):
        return False


def _seed(value) -> int | None:
    seed = whole("seed", value)
    return None if seed is None or seed < 0 else seed


def _float(value) -> float | None:
    return None if value is None or value == "" else float(value)


def _upload_path(value) -> str | None:
    """The input image's file, from the image component's unprocessed value (gradio's FileData).

    The Generate event takes its inputs unprocessed: gradio's own image preprocessing would
    decode the file first and turn an unreadable one into a traceback, where the studio's
    reader (`studio.images.open_image`) says what is wrong. Gradio still moves the file into
    its cache and checks it is an upload before the event sees it.
    """
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("path") or None
    return str(value)


def _notes_markdown(notes) -> str:
    return "\n".join(f"- {note}" for note in notes)


def build(studio, bus: Bus) -> EditingTab:
    models = studio.models
    runs = SessionRuns(studio)

    def defaults(name: str, fallback_guidance: float) -> dict:
        try:
            spec = models.resolve(name)
        except ModelError:
            return {"steps": 25, "guidance": fallback_guidance, "image_guidance": DEFAULT_IMAGE_GUIDANCE}
        d = model_defaults(spec)
        d["image_guidance"] = spec.defaults.get("image_guidance", DEFAULT_IMAGE_GUIDANCE)
        return d

    sd_start = defaults(studio.default_model, 4.0)
    ip_start = defaults(IP2P_MODEL, 5.0)

    with gr.Row():
        with gr.Column(scale=3):
            input_image = gr.Image(
                label="Input image",
                type="filepath",
                format="png",
                image_mode=None,  # the core flattens transparency over white and reads EXIF
                sources=["upload", "clipboard"],
                height=256,
                elem_id="edit-input",
            )
            mode = gr.Radio(list(MODES), value=SDEDIT, label="Technique", elem_id="edit-mode")
            with gr.Column(visible=True, elem_id="edit-sdedit") as sd_box:
                sd_model = gr.Dropdown(
                    [s.name for s in models.pipelines()],
                    value=studio.default_model,
                    label="Model",
                    allow_custom_value=True,
                    info="A catalog name, a local diffusers folder, a .safetensors file or a hub id",
                    elem_id="sdedit-model",
                )
                sd_prompt = gr.Textbox(
                    label="Prompt",
                    lines=2,
                    placeholder="what the picture should become: a blue circle in the center",
                    elem_id="sdedit-prompt",
                )
                sd_negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="sdedit-negative")
                sd_strength = gr.Slider(
                    0,
                    1,
                    value=0.6,
                    step=0.01,
                    label="Strength",
                    info="0 keeps the input, 1 ignores it (pure text-to-image)",
                    elem_id="sdedit-strength",
                )
                with gr.Row():
                    sd_steps = gr.Slider(
                        1, 150, value=sd_start["steps"], step=1, label="Steps", elem_id="sdedit-steps"
                    )
                    sd_guidance = gr.Slider(
                        0, 30, value=sd_start["guidance"], step=0.5, label="Guidance (CFG)"
                    )
                with gr.Row():
                    sd_scheduler = gr.Dropdown(
                        [MODEL_DEFAULT] + scheduler_names(), value=MODEL_DEFAULT, label="Sampler"
                    )
                    sd_seed = gr.Number(
                        value=-1, precision=0, label="Seed (-1: random)", elem_id="sdedit-seed"
                    )
                with gr.Row():
                    sd_batch = gr.Slider(1, 8, value=1, step=1, label="Batch size")
                    sd_fit = gr.Radio(
                        ["crop", "resize"],
                        value="crop",
                        label="Fit to a multiple of 8",
                        info="crop: centre crop, nothing rescaled; resize: rescale",
                    )
                with gr.Accordion("LoRA stack, flow shift", open=False):
                    sd_loras = gr.Textbox(
                        label="LoRA stack",
                        lines=2,
                        placeholder="lcm-lora-sdv1-5:1.0  or  /path/to/lora.safetensors:0.8, one a line",
                    )
                    sd_shift = gr.Number(
                        value=None, label="Flow-matching shift (SD3 / FLUX; empty: the model's)"
                    )
            with gr.Column(visible=False, elem_id="edit-ip2p") as ip_box:
                ip_model = gr.Dropdown(
                    [s.name for s in models.pipelines("ip2p")],
                    value=IP2P_MODEL,
                    label="InstructPix2Pix model",
                    allow_custom_value=True,
                    info="An InstructPix2Pix model (8-channel UNet): catalog name, folder or hub id",
                    elem_id="ip2p-model",
                )
                ip_instruction = gr.Textbox(
                    label="Instruction",
                    lines=2,
                    placeholder="make the circle blue",
                    elem_id="ip2p-instruction",
                )
                ip_negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="ip2p-negative")
                with gr.Row():
                    ip_guidance = gr.Slider(
                        0, 30, value=ip_start["guidance"], step=0.5, label="Text guidance (s_T)"
                    )
                    ip_image_guidance = gr.Slider(
                        0,
                        10,
                        value=ip_start["image_guidance"],
                        step=0.1,
                        label="Image guidance (s_I)",
                        info="higher keeps closer to the input",
                    )
                with gr.Row():
                    ip_steps = gr.Slider(
                        1, 150, value=ip_start["steps"], step=1, label="Steps", elem_id="ip2p-steps"
                    )
                    ip_scheduler = gr.Dropdown(
                        [MODEL_DEFAULT] + scheduler_names(), value=MODEL_DEFAULT, label="Sampler"
                    )
                with gr.Row():
                    ip_seed = gr.Number(value=-1, precision=0, label="Seed (-1: random)", elem_id="ip2p-seed")
                    ip_batch = gr.Slider(1, 8, value=1, step=1, label="Batch size")
                ip_fit = gr.Radio(
                    ["crop", "resize"],
                    value="crop",
                    label="Fit to a multiple of 8",
                    info="crop: centre crop, nothing rescaled; resize: rescale",
                )
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id="edit-generate")
                stop = gr.Button("Stop", variant="stop", elem_id="edit-stop")
        with gr.Column(scale=2):
            preview = gr.Image(label="Preview", type="pil", interactive=False, height=160)
            images = gr.Gallery(label="Results", format="png", columns=2, elem_id="edit-images")
            info = gr.Markdown(elem_id="edit-info")
            compare = gr.ImageSlider(
                label="Before / after",
                type="filepath",
                format="png",
                interactive=False,
                elem_id="edit-compare",
            )
            sharing = sharing_rows(TECHNIQUES, "editing", "my-edit", "edit")
    source_id = gr.State(None)  # the gallery item the input image is, when it is one

    fields = {
        "sdedit": {
            "model": sd_model,
            "prompt": sd_prompt,
            "negative_prompt": sd_negative,
            "strength": sd_strength,
            "steps": sd_steps,
            "guidance": sd_guidance,
            "scheduler": sd_scheduler,
            "seed": sd_seed,
            "batch_size": sd_batch,
            "fit": sd_fit,
            "loras": sd_loras,
            "shift": sd_shift,
        },
        "ip2p": {
            "model": ip_model,
            "instruction": ip_instruction,
            "negative_prompt": ip_negative,
            "guidance": ip_guidance,
            "image_guidance": ip_image_guidance,
            "steps": ip_steps,
            "scheduler": ip_scheduler,
            "seed": ip_seed,
            "batch_size": ip_batch,
            "fit": ip_fit,
        },
    }
    field_list = [*fields["sdedit"].values(), *fields["ip2p"].values()]
    settings_inputs = {*field_list, mode, source_id}  # what to_settings reads
    form = settings_inputs | {input_image}

    # ---- widgets <-> settings ------------------------------------------------------------

    def to_settings(data: dict) -> SDEditSettings | InstructPix2PixSettings:
        technique = MODES.get(data[mode], "sdedit")
        v = {name: data[component] for name, component in fields[technique].items()}
        common = dict(
            model=v["model"] or "",
            negative_prompt=v["negative_prompt"] or "",
            seed=_seed(v["seed"]),
            steps=whole("steps", v["steps"]),
            guidance=_float(v["guidance"]),
            scheduler=None if v["scheduler"] in (None, MODEL_DEFAULT) else v["scheduler"],
            batch_size=whole("batch size", v["batch_size"]) or 1,
            fit=v["fit"] or "crop",
            source_id=data[source_id],
        )
        if technique == "sdedit":
            return SDEditSettings(
                prompt=v["prompt"] or "",
                strength=0.6 if v["strength"] is None else float(v["strength"]),
                loras=parse_loras(v["loras"]),
                shift=float(v["shift"]) if v["shift"] not in (None, "", 0) else None,
                **common,
            )
        return InstructPix2PixSettings(
            instruction=v["instruction"] or "", image_guidance=_float(v["image_guidance"]), **common
        )

    def to_form(s) -> dict:
        """The widgets of the settings' technique (and the mode radio); the input image is separate."""
        common = {
            "model": s.model,
            "negative_prompt": s.negative_prompt,
            "scheduler": s.scheduler or MODEL_DEFAULT,
            "seed": -1 if s.seed is None else s.seed,
            "batch_size": s.batch_size,
            "fit": s.fit,
        }
        if s.technique == "sdedit":
            start = sd_start
            values = {
                "prompt": s.prompt,
                "strength": s.strength,
                "loras": format_loras(s.loras),
                "shift": s.shift,
            }
        else:
            start = ip_start
            image_guidance = s.image_guidance if s.image_guidance is not None else ip_start["image_guidance"]
            values = {"instruction": s.instruction, "image_guidance": image_guidance}
        values.update(common)
        values["steps"] = s.steps or start["steps"]
        values["guidance"] = s.guidance if s.guidance is not None else start["guidance"]
        form_values = {fields[s.technique][name]: value for name, value in values.items()}
        form_values[mode] = LABELS[s.technique]
        return form_values

    def source_values(item_id) -> dict:
        """Load gallery item `item_id` as the input image (its id becomes the source)."""
        try:
            item = studio.gallery.get(item_id) if item_id is not None else None
        except (ValueError, TypeError):
            item = None
        if item is None or not _existing(item.image_path):
            gr.Warning(f"Gallery image #{item_id} is no longer there: upload the input image again.")
            return {input_image: None, source_id: None}
        return {input_image: item.image_path, source_id: item.id}

    # ---- events ----------------------------------------------------------------------------

    def show_mode(label):
        return gr.Column(visible=label == SDEDIT), gr.Column(visible=label == IP2P)

    @user_errors
    def show_sd_defaults(name):
        d = model_defaults(models.resolve(name))
        return {sd_steps: d["steps"], sd_guidance: d["guidance"], sd_scheduler: MODEL_DEFAULT}

    @user_errors
    def show_ip_defaults(name):
        spec = models.resolve(name)
        d = model_defaults(spec)
        return {
            ip_steps: d["steps"],
            ip_guidance: d["guidance"],
            ip_image_guidance: spec.defaults.get("image_guidance", DEFAULT_IMAGE_GUIDANCE),
            ip_scheduler: MODEL_DEFAULT,
        }

    def forget_source():
        return None  # a new upload, paste or clear: the input is no longer a gallery item

    @on_gpu
    @user_errors_gen
    def run_edit(data: dict, request: gr.Request, progress=gr.Progress()):
        settings = to_settings(data)
        image = _upload_path(data[input_image])
        if image is None:
            settings = settings.replace(source_id=None)  # the service says "no input image"
        elif settings.source_id is not None and studio.gallery.get(settings.source_id) is None:
            settings = settings.replace(source_id=None)  # that item was deleted: the picture is an upload
        run = studio.sdedit if settings.technique == "sdedit" else studio.ip2p

        def job(on_step):
            return run(settings, image, on_step=on_step)

        for kind, payload in runs.stream(request, progress, settings.model, job):
            if kind == "preview":
                yield {preview: payload}
            elif kind == "cancelled":
                yield {info: "Cancelled: nothing was stored.", preview: None}
            else:
                result, items = payload
                yield {
                    images: gallery_value(result, items),
                    info: describe(result, items),
                    compare: (image, items[0].image_path if items else result.images[0]),
                    preview: None,
                    # the stored upload (or the gallery item edited) is the source from now on
                    source_id: result.settings.source_id,
                }
                return

    def gallery_value(result, items) -> list:
        if items:
            return [(item.image_path, f"seed {item.seed}") for item in items]
        return [(img, f"seed {seed}") for img, seed in zip(result.images, result.seeds, strict=False)]

    def describe(result, items) -> str:
        s = result.settings
        parts = [
            f"**{len(result.images)} image(s)** · {LABELS[s.technique]}",
            f"model `{s.model}`",
            f"{s.scheduler} · {s.steps} steps",
        ]
        if s.technique == "sdedit":
            parts.append(f"guidance {s.guidance:g} · strength {s.strength:g}")
        else:
            parts.append(f"text guidance {s.guidance:g} · image guidance {s.image_guidance:g}")
        parts.append(f"{s.width}×{s.height}")
        parts.append(f"seeds {', '.join(map(str, result.seeds))}")
        parts.append(f"{result.duration_s:.2f} s")
        if items:
            parts.append(f"gallery ids {', '.join(str(i.id) for i in items)}")
            if items[0].parent_id is not None:
                parts.append(f"edit of #{items[0].parent_id}")
        else:
            parts.append("nothing was stored")
        notes = _notes_markdown(result.notes)
        return " · ".join(parts) + (f"\n\n{notes}" if notes else "")

    def from_bus(message):
        # gr.skip() when the message is not for this tab: nothing here changes
        if not message or message.get("target") != "editing":
            return gr.skip()
        data = message.get("settings")
        if not data:  # "Send to editing": the gallery image becomes the input
            return source_values(message.get("image_id"))
        technique = data.get("technique") if isinstance(data, dict) else None
        cls = {"sdedit": SDEditSettings, "ip2p": InstructPix2PixSettings}.get(technique)
        if cls is None:
            return gr.skip()
        try:
            settings = cls.from_dict(data)
        except SettingsError as exc:
            gr.Warning(f"Those settings could not be restored: {exc}")
            return gr.skip()
        values = to_form(settings)
        if settings.source_id is not None:
            values.update(source_values(settings.source_id))
        return values

    def api_endpoint(cls, run):
        @on_gpu
        @user_errors
        def endpoint(image, settings: dict):
            s = cls.from_dict(settings)
            result, items = run(s, image)
            paths = [item.image_path for item in items] or list(result.images)
            return paths, {
                "ids": [item.id for item in items],
                "seeds": result.seeds,
                "duration_s": result.duration_s,
                "settings": [item.settings for item in items],
                "notes": list(result.notes),
                "parent_id": items[0].parent_id if items else result.settings.source_id,
            }

        endpoint.__name__ = f"api_{cls.technique}"
        return endpoint

    # ---- wiring ----------------------------------------------------------------------------

    outputs = [preview, images, info, compare, source_id]
    mode.change(show_mode, mode, [sd_box, ip_box], api_visibility="private", queue=False)
    # .input, not .change: only a model the user picks brings its defaults (see tabs/txt2img.py)
    sd_model.input(
        show_sd_defaults, sd_model, [sd_steps, sd_guidance, sd_scheduler], api_visibility="private"
    )
    ip_model.input(
        show_ip_defaults,
        ip_model,
        [ip_steps, ip_guidance, ip_image_guidance, ip_scheduler],
        api_visibility="private",
    )
    gr.on(
        [input_image.upload, input_image.clear],
        forget_source,
        None,
        source_id,
        api_visibility="private",
        queue=False,
    )
    gr.on(
        [generate.click, sd_prompt.submit, ip_instruction.submit],
        run_edit,
        form,
        outputs,
        concurrency_id=GPU_LANE,
        concurrency_limit=1,
        api_visibility="private",
        preprocess=False,  # the input image reaches the studio's reader as a file (see _upload_path)
    )
    stop.click(runs.cancel, None, None, queue=False, api_visibility="private")
    sharing.wire(
        inputs=settings_inputs,
        outputs=[*field_list, mode],
        settings_of=to_settings,
        to_form=to_form,
        for_preset=lambda s: s.replace(source_id=None),  # a preset is for any picture
    )
    on_message(bus, from_bus, [*field_list, mode, input_image, source_id])

    api_only(api_endpoint(SDEditSettings, studio.sdedit), "sdedit", files=("one",))
    api_only(api_endpoint(InstructPix2PixSettings, studio.ip2p), "ip2p", files=("one",))
    return EditingTab(
        fields=fields,
        mode=mode,
        image=input_image,
        source_id=source_id,
        generate=generate,
        images=images,
        info=info,
        compare=compare,
    )


def main() -> None:
    from .launch import run_alone

    run_alone(build, "editing")


if __name__ == "__main__":
    main()
