"""The txt2img tab: widgets in, `Txt2ImgSettings` out, `Studio.txt2img` on the GPU lane.

Run it alone with `python -m tabs.txt2img`.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from studio.models import LoraRef
from studio.schedulers import scheduler_names
from studio.settings import SettingsError
from studio.txt2img import Txt2ImgSettings, model_defaults

from .common import GPU_LANE, Bus, SessionRuns, on_gpu, on_message, user_errors, user_errors_gen, whole
from .sharing import sharing_rows

MODEL_DEFAULT = "(model default)"


@dataclass
class Txt2ImgTab:
    fields: dict  # settings field name -> component
    generate: gr.Button
    images: gr.Gallery


def parse_size(name: str, text: str) -> tuple[int, int] | None:
    text = (text or "").strip().lower()
    if not text:
        return None
    w, sep, h = text.replace(" ", "").partition("x")
    if not sep or not w.isdigit() or not h.isdigit():
        raise SettingsError(f"{name} must look like 1024x1024, not {text[:40]!r}")
    return int(w), int(h)


def parse_point(name: str, text: str) -> tuple[int, int]:
    text = (text or "").strip()
    if not text:
        return (0, 0)
    x, sep, y = text.replace(" ", "").partition(",")
    if not sep or not x.isdigit() or not y.isdigit():
        raise SettingsError(f"{name} must look like 0,0, not {text[:40]!r}")
    return int(x), int(y)


def parse_loras(text: str) -> tuple[LoraRef, ...]:
    loras = []
    for line in (text or "").splitlines():
        line = line.strip()
        if not line:
            continue
        source, sep, weight = line.rpartition(":")
        if sep and source:
            try:
                loras.append(LoraRef(source.strip(), float(weight)))
                continue
            except ValueError:
                pass
        loras.append(LoraRef(line, 1.0))
    return tuple(loras)


def format_loras(loras) -> str:
    return "\n".join(f"{lora.source}:{lora.weight:g}" for lora in loras)


def build(studio, bus: Bus) -> Txt2ImgTab:
    models = studio.models
    runs = SessionRuns(studio)

    with gr.Row():
        with gr.Column(scale=3):
            model = gr.Dropdown(
                [s.name for s in models.pipelines()],
                value=studio.default_model,
                label="Model",
                allow_custom_value=True,
                info="A catalog name, a local diffusers folder, a .safetensors file or a hub id",
            )
            prompt = gr.Textbox(
                label="Prompt", lines=2, placeholder="a red circle on the left", elem_id="t2i-prompt"
            )
            negative = gr.Textbox(label="Negative prompt", lines=1)
            with gr.Row():
                scheduler = gr.Dropdown(
                    [MODEL_DEFAULT] + scheduler_names(), value=MODEL_DEFAULT, label="Sampler"
                )
                seed = gr.Number(value=-1, precision=0, label="Seed (-1: random)")
            with gr.Row():
                steps = gr.Slider(1, 150, value=25, step=1, label="Steps")
                guidance = gr.Slider(0, 30, value=4.0, step=0.5, label="Guidance (CFG)")
            with gr.Row():
                width = gr.Slider(64, 2048, value=64, step=8, label="Width")
                height = gr.Slider(64, 2048, value=64, step=8, label="Height")
            with gr.Row():
                batch_size = gr.Slider(1, 8, value=1, step=1, label="Batch size")
                batch_count = gr.Slider(1, 16, value=1, step=1, label="Batch count")
            loras = gr.Textbox(
                label="LoRA stack",
                lines=2,
                placeholder="lcm-lora-sdv1-5:1.0  or  /path/to/lora.safetensors:0.8, one a line",
            )
            with gr.Row():
                add_lora = gr.Dropdown(
                    [], value=None, label="Add a LoRA (catalog and trained here)", elem_id="t2i-add-lora"
                )
                add_word = gr.Dropdown(
                    [], value=None, label="Add a trained word (textual inversion)", elem_id="t2i-add-word"
                )
            with gr.Accordion("Family options (SDXL, SD3, FLUX)", open=False):
                shift = gr.Number(value=None, label="Flow-matching shift (SD3 / FLUX; empty: the model's)")
                with gr.Row():
                    original_size = gr.Textbox(label="SDXL original size (WxH)", placeholder="1024x1024")
                    target_size = gr.Textbox(label="SDXL target size (WxH)", placeholder="1024x1024")
                    crop = gr.Textbox(label="SDXL crop top-left (x,y)", placeholder="0,0")
                with gr.Row():
                    refiner = gr.Dropdown(
                        ["", "sdxl-refiner"], value="", label="SDXL refiner", allow_custom_value=True
                    )
                    refiner_fraction = gr.Slider(
                        0, 1, value=0.8, step=0.05, label="Base model's share of the steps"
                    )
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id="t2i-generate")
                stop = gr.Button("Stop", variant="stop", elem_id="t2i-stop")
        with gr.Column(scale=2):
            preview = gr.Image(
                label="Preview", type="pil", interactive=False, height=160, elem_id="t2i-preview"
            )
            images = gr.Gallery(label="Images", format="png", columns=2, elem_id="t2i-images")
            info = gr.Markdown(elem_id="t2i-info")
            sharing = sharing_rows(("txt2img",), "txt2img", "my-preset", "t2i")

    fields = {
        "model": model,
        "prompt": prompt,
        "negative_prompt": negative,
        "scheduler": scheduler,
        "seed": seed,
        "steps": steps,
        "guidance": guidance,
        "width": width,
        "height": height,
        "batch_size": batch_size,
        "batch_count": batch_count,
        "loras": loras,
        "shift": shift,
        "original_size": original_size,
        "target_size": target_size,
        "crop_top_left": crop,
        "refiner": refiner,
        "refiner_fraction": refiner_fraction,
    }
    form = set(fields.values())

    def to_settings(data: dict) -> Txt2ImgSettings:
        v = {name: data[component] for name, component in fields.items()}
        seed_value = whole("seed", v["seed"])
        return Txt2ImgSettings(
            prompt=v["prompt"] or "",
            model=v["model"] or "",
            negative_prompt=v["negative_prompt"] or "",
            seed=None if seed_value is None or seed_value < 0 else seed_value,
            steps=whole("steps", v["steps"]),
            guidance=float(v["guidance"]) if v["guidance"] is not None else None,
            width=whole("width", v["width"]),
            height=whole("height", v["height"]),
            scheduler=None if v["scheduler"] in (None, MODEL_DEFAULT) else v["scheduler"],
            batch_size=whole("batch size", v["batch_size"]) or 1,
            batch_count=whole("batch count", v["batch_count"]) or 1,
            loras=parse_loras(v["loras"]),
            shift=float(v["shift"]) if v["shift"] not in (None, "", 0) else None,
            original_size=parse_size("original size", v["original_size"]),
            target_size=parse_size("target size", v["target_size"]),
            crop_top_left=parse_point("crop top-left", v["crop_top_left"]),
            refiner=v["refiner"] or None,
            refiner_fraction=float(v["refiner_fraction"]),
        )

    def to_form(s: Txt2ImgSettings) -> dict:
        return {
            model: s.model,
            prompt: s.prompt,
            negative: s.negative_prompt,
            scheduler: s.scheduler or MODEL_DEFAULT,
            seed: -1 if s.seed is None else s.seed,
            steps: s.steps or 25,
            guidance: s.guidance if s.guidance is not None else 4.0,
            width: s.width or 64,
            height: s.height or 64,
            batch_size: s.batch_size,
            batch_count: s.batch_count,
            loras: format_loras(s.loras),
            shift: s.shift,
            original_size: "x".join(map(str, s.original_size)) if s.original_size else "",
            target_size: "x".join(map(str, s.target_size)) if s.target_size else "",
            crop: ",".join(map(str, s.crop_top_left)),
            refiner: s.refiner or "",
            refiner_fraction: s.refiner_fraction,
        }

    @user_errors
    def show_model_defaults(name):
        d = model_defaults(models.resolve(name))
        return {
            steps: d["steps"],
            guidance: d["guidance"],
            width: d["width"] or 512,
            height: d["height"] or 512,
            scheduler: MODEL_DEFAULT,
        }

    @on_gpu
    @user_errors_gen
    def run_generation(data: dict, request: gr.Request, progress=gr.Progress()):
        settings = to_settings(data)

        def job(on_step):
            return studio.txt2img(settings, on_step=on_step)

        for kind, payload in runs.stream(request, progress, settings.model, job):
            if kind == "preview":
                yield {preview: payload}
            elif kind == "cancelled":
                yield {info: "Cancelled: nothing was stored.", preview: None}
            else:
                result, items = payload
                s = result.settings
                text = (
                    f"**{len(items)} image(s)** · model `{s.model}` · {s.scheduler} · {s.steps} steps · "
                    f"guidance {s.guidance} · seeds {', '.join(map(str, result.seeds))} · "
                    f"{result.duration_s:.2f} s · gallery ids {', '.join(str(i.id) for i in items)}"
                )
                yield {
                    images: [(item.image_path, f"seed {item.seed}") for item in items],
                    info: text,
                    seed: -1 if settings.seed is None else settings.seed,
                    preview: None,
                }
                return

    def from_bus(message):
        # gr.skip(), not {}: an empty dict is one output value, and this event has 18 outputs
        if not message or message.get("target") != "txt2img" or not message.get("settings"):
            return gr.skip()
        try:
            return to_form(Txt2ImgSettings.from_dict(message["settings"]))
        except SettingsError as exc:
            gr.Warning(f"Those settings could not be restored: {exc}")
            return gr.skip()

    @on_gpu
    @user_errors
    def api_txt2img(settings: dict):
        result, items = studio.txt2img(Txt2ImgSettings.from_dict(settings))
        return [item.image_path for item in items], {
            "ids": [item.id for item in items],
            "seeds": result.seeds,
            "duration_s": result.duration_s,
            "settings": [item.settings for item in items],
        }

    def lora_choices():
        return gr.Dropdown(choices=[spec.name for spec in studio.models.loras()], value=None)

    def word_choices():
        return gr.Dropdown(choices=list(studio.models.embeddings()), value=None)

    def append_lora(name, text):
        if not name:
            return gr.skip(), gr.skip()
        return "\n".join(filter(None, [(text or "").strip(), f"{name}:1.0"])), None

    def append_word(word, text):
        if not word:
            return gr.skip(), gr.skip()
        return f"{(text or '').rstrip()} {word}".strip(), None

    # the lists are read when opened, so what the Trainer just made is there
    add_lora.focus(lora_choices, None, add_lora, api_visibility="private", queue=False)
    add_word.focus(word_choices, None, add_word, api_visibility="private", queue=False)
    add_lora.input(append_lora, [add_lora, loras], [loras, add_lora], api_visibility="private", queue=False)
    add_word.input(append_word, [add_word, prompt], [prompt, add_word], api_visibility="private", queue=False)

    # .input, not .change: only a model the user picks brings its defaults; restored settings
    # (share links, the gallery's "Restore settings") set the model and keep their own values
    model.input(
        show_model_defaults, model, [steps, guidance, width, height, scheduler], api_visibility="private"
    )
    generate.click(
        run_generation,
        form,
        [preview, images, info, seed],
        concurrency_id=GPU_LANE,
        concurrency_limit=1,
        api_visibility="private",
    )
    prompt.submit(
        run_generation,
        form,
        [preview, images, info, seed],
        concurrency_id=GPU_LANE,
        concurrency_limit=1,
        api_visibility="private",
    )
    stop.click(runs.cancel, None, None, queue=False, api_visibility="private")
    sharing.wire(inputs=form, outputs=list(fields.values()), settings_of=to_settings, to_form=to_form)
    on_message(bus, from_bus, list(fields.values()))

    api_in = gr.JSON(visible=False)
    api_images = gr.Gallery(visible=False, format="png")
    api_out = gr.JSON(visible=False)
    api_button = gr.Button(visible=False)
    api_button.click(
        api_txt2img,
        api_in,
        [api_images, api_out],
        api_name="txt2img",
        concurrency_id=GPU_LANE,
        concurrency_limit=1,
    )
    return Txt2ImgTab(fields=fields, generate=generate, images=images)


def main() -> None:
    from .launch import run_alone

    run_alone(build, "txt2img")


if __name__ == "__main__":
    main()
