"""The Prompt-to-Prompt tab: a prompt, an edited prompt, and how to carry the source's
attention over; `Studio.p2p` on the GPU lane.

Shows the source and the edited image (before/after), and each prompt's per-token
cross-attention maps over its image. Both images go to the gallery, the edited one as the
source's child.

API (a hidden button, for gradio_client): `/p2p(settings)`, `settings` a settings dict;
returns `[source, edited, source attention, edited attention]` image paths and
`{"ids", "seed", "duration_s", "settings", "notes"}`.

Run it alone with `python -m tabs.p2p`.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from studio.models import ModelError
from studio.p2p import (
    MODES,
    PAPER_REPLACE,
    SUPPORTED_FAMILIES,
    PromptToPromptSettings,
    Reweight,
    p2p_defaults,
)
from studio.schedulers import scheduler_names
from studio.settings import SettingsError

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
from .txt2img import MODEL_DEFAULT

MODE_HELP = {
    "replace": "swap words one for one: a red **circle** → a red **square**",
    "refine": "add words: a circle → a **large blue** circle",
    "reweight": "same prompt, one word's weight scaled (its share in the later token states; below 1 "
    "its attention map too): leave the edit prompt empty",
}


@dataclass
class P2PTab:
    fields: dict  # settings field name -> component
    generate: gr.Button
    compare: gr.ImageSlider
    maps: tuple  # (source attention, edited attention) images
    info: gr.Markdown


def parse_reweights(text: str) -> tuple[Reweight, ...]:
    """`red:2, circle:0.5` (commas or lines) → Reweight entries."""
    entries = []
    for part in (text or "").replace("\n", ",").split(","):
        part = part.strip()
        if not part:
            continue
        word, sep, factor = part.rpartition(":")
        try:
            if not sep or not word.strip():
                raise ValueError
            entries.append(Reweight(word.strip(), float(factor)))
        except ValueError:
            raise SettingsError(f"reweight entries look like red:2, not {part[:40]!r}") from None
    return tuple(entries)


def format_reweights(entries) -> str:
    return ", ".join(f"{e.word}:{e.factor:g}" for e in entries)


def build(studio, bus: Bus) -> P2PTab:
    models = studio.models
    runs = SessionRuns(studio)
    sd_models = [s.name for s in models.pipelines() if s.family in SUPPORTED_FAMILIES]

    def defaults(name: str) -> dict:
        """Sampling defaults and replace fractions of a model (an unknown name: the usual ones)."""
        try:
            spec = models.resolve(name)
        except ModelError:
            return {"steps": 25, "guidance": 7.0, **PAPER_REPLACE}
        return p2p_defaults(spec)

    start = defaults(studio.default_model)
    first = studio.default_model if studio.default_model in sd_models else (sd_models or [None])[0]

    with gr.Row():
        with gr.Column(scale=3):
            model = gr.Dropdown(
                sd_models,
                value=first,
                label="Model (SD 1.x / 2.x)",
                allow_custom_value=True,
                info="Prompt-to-Prompt controls UNet cross-attention: SD 1.x / 2.x models and toy-sd",
                elem_id="p2p-model",
            )
            prompt = gr.Textbox(
                label="Prompt", lines=2, placeholder="a red circle on the left", elem_id="p2p-prompt"
            )
            edit_prompt = gr.Textbox(
                label="Edited prompt",
                lines=2,
                placeholder="a red square on the left",
                elem_id="p2p-edit-prompt",
            )
            mode = gr.Radio(list(MODES), value="replace", label="Edit", elem_id="p2p-mode")
            mode_help = gr.Markdown(MODE_HELP["replace"])
            with gr.Row():
                cross_replace = gr.Slider(
                    0,
                    1,
                    value=start["cross_replace"],
                    step=0.05,
                    label="Cross-attention replace",
                    info="share of the steps that use the source's word maps",
                )
                self_replace = gr.Slider(
                    0,
                    1,
                    value=start["self_replace"],
                    step=0.05,
                    label="Self-attention replace",
                    info="share of the steps that use the source's layout",
                )
            with gr.Row():
                local_blend = gr.Textbox(
                    label="Local blend words",
                    placeholder="circle square",
                    info="change only where these words attend (in either prompt)",
                    elem_id="p2p-local-blend",
                )
                reweight = gr.Textbox(
                    label="Reweight",
                    placeholder="red:3",
                    info="WORD:FACTOR, comma separated: 0 takes the word away, below 1 weakens it, above 1 strengthens it",
                    elem_id="p2p-reweight",
                )
            with gr.Accordion("Sampling", open=False):
                negative = gr.Textbox(label="Negative prompt", lines=1)
                with gr.Row():
                    steps = gr.Slider(
                        1, 150, value=start["steps"], step=1, label="Steps", elem_id="p2p-steps"
                    )
                    guidance = gr.Slider(0, 30, value=start["guidance"], step=0.5, label="Guidance (CFG)")
                with gr.Row():
                    scheduler = gr.Dropdown(
                        [MODEL_DEFAULT] + scheduler_names(), value=MODEL_DEFAULT, label="Sampler"
                    )
                    seed = gr.Number(value=-1, precision=0, label="Seed (-1: random)", elem_id="p2p-seed")
                with gr.Row():
                    blend_threshold = gr.Slider(0, 1, value=0.3, step=0.05, label="Local blend threshold")
                    map_size = gr.Number(
                        value=0, precision=0, label="Attention map layers (latent width; 0: finest ≤ 16)"
                    )
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id="p2p-generate")
                stop = gr.Button("Stop", variant="stop", elem_id="p2p-stop")
        with gr.Column(scale=3):
            preview = gr.Image(label="Preview", type="pil", interactive=False, height=160)
            compare = gr.ImageSlider(
                label="Source / edited", type="pil", format="png", interactive=False, elem_id="p2p-compare"
            )
            info = gr.Markdown(elem_id="p2p-info")
            source_maps = gr.Image(
                label="Source prompt: cross-attention per token",
                type="pil",
                format="png",
                interactive=False,
                elem_id="p2p-source-maps",
            )
            edited_maps = gr.Image(
                label="Edited prompt: cross-attention per token",
                type="pil",
                format="png",
                interactive=False,
                elem_id="p2p-edited-maps",
            )
            sharing = sharing_rows(("p2p",), "Prompt-to-Prompt", "my-p2p", "p2p")

    fields = {
        "model": model,
        "prompt": prompt,
        "edit_prompt": edit_prompt,
        "mode": mode,
        "cross_replace": cross_replace,
        "self_replace": self_replace,
        "local_blend": local_blend,
        "reweight": reweight,
        "negative_prompt": negative,
        "steps": steps,
        "guidance": guidance,
        "scheduler": scheduler,
        "seed": seed,
        "blend_threshold": blend_threshold,
        "map_size": map_size,
    }
    form = set(fields.values())

    # ---- widgets <-> settings ------------------------------------------------------------

    def to_settings(data: dict) -> PromptToPromptSettings:
        v = {name: data[component] for name, component in fields.items()}
        seed_value = whole("seed", v["seed"])
        return PromptToPromptSettings(
            model=v["model"] or "",
            prompt=v["prompt"] or "",
            edit_prompt=v["edit_prompt"] or "",
            mode=v["mode"] or "replace",
            cross_replace=float(v["cross_replace"]),
            self_replace=float(v["self_replace"]),
            local_blend=tuple((v["local_blend"] or "").replace(",", " ").split()),
            reweight=parse_reweights(v["reweight"]),
            negative_prompt=v["negative_prompt"] or "",
            steps=whole("steps", v["steps"]),
            guidance=None if v["guidance"] is None else float(v["guidance"]),
            scheduler=None if v["scheduler"] in (None, MODEL_DEFAULT) else v["scheduler"],
            seed=None if seed_value is None or seed_value < 0 else seed_value,
            blend_threshold=float(v["blend_threshold"]),
            map_size=whole("attention map size", v["map_size"]) or None,
        )

    def to_form(s: PromptToPromptSettings) -> dict:
        d = defaults(s.model)
        values = {
            "model": s.model,
            "prompt": s.prompt,
            "edit_prompt": s.edit_prompt,
            "mode": s.mode,
            "cross_replace": d["cross_replace"] if s.cross_replace is None else s.cross_replace,
            "self_replace": d["self_replace"] if s.self_replace is None else s.self_replace,
            "local_blend": " ".join(s.local_blend),
            "reweight": format_reweights(s.reweight),
            "negative_prompt": s.negative_prompt,
            "steps": s.steps or d["steps"],
            "guidance": s.guidance if s.guidance is not None else d["guidance"],
            "scheduler": s.scheduler or MODEL_DEFAULT,
            "seed": -1 if s.seed is None else s.seed,
            "blend_threshold": s.blend_threshold,
            "map_size": s.map_size or 0,
        }
        return {fields[name]: value for name, value in values.items()}

    # ---- events ----------------------------------------------------------------------------

    @user_errors
    def show_defaults(name):
        d = p2p_defaults(models.resolve(name))
        return {
            steps: d["steps"],
            guidance: d["guidance"],
            scheduler: MODEL_DEFAULT,
            cross_replace: d["cross_replace"],
            self_replace: d["self_replace"],
        }

    @on_gpu
    @user_errors_gen
    def run_p2p(data: dict, request: gr.Request, progress=gr.Progress()):
        settings = to_settings(data)

        def job(on_step):
            return studio.p2p(settings, on_step=on_step)

        for kind, payload in runs.stream(request, progress, settings.model, job):
            if kind == "preview":
                yield {preview: payload}
            elif kind == "cancelled":
                yield {info: "Cancelled: nothing was stored.", preview: None}
            else:
                result, items = payload
                yield {
                    compare: tuple(result.images),
                    source_maps: result.figures["source attention"],
                    edited_maps: result.figures["edited attention"],
                    info: describe(result, items),
                    preview: None,
                }
                return

    def describe(result, items) -> str:
        s = result.settings
        parts = [
            f"**{s.mode}**: “{s.prompt}” → “{s.edited_prompt}”",
            f"model `{s.model}` · {s.scheduler} · {s.steps} steps · guidance {s.guidance:g}",
            f"cross {s.cross_replace:g} · self {s.self_replace:g} · seed {s.seed}",
            f"{result.duration_s:.2f} s",
        ]
        if items:
            parts.append(f"gallery #{items[0].id} (source) and #{items[1].id} (edited, its child)")
        notes = "\n".join(f"- {note}" for note in result.notes)
        return " · ".join(parts) + (f"\n\n{notes}" if notes else "")

    def from_bus(message):
        if not message or message.get("target") != "p2p" or not message.get("settings"):
            return gr.skip()
        try:
            return to_form(PromptToPromptSettings.from_dict(message["settings"]))
        except SettingsError as exc:
            gr.Warning(f"Those settings could not be restored: {exc}")
            return gr.skip()

    @on_gpu
    @user_errors
    def api_p2p(settings: dict):
        result, items = studio.p2p(PromptToPromptSettings.from_dict(settings))
        images = [item.image_path for item in items] or list(result.images)
        return images + list(result.figures.values()), {
            "ids": [item.id for item in items],
            "seed": result.settings.seed,
            "duration_s": result.duration_s,
            "settings": result.settings.to_dict(),
            "notes": list(result.notes),
        }

    # ---- wiring ----------------------------------------------------------------------------

    field_list = list(fields.values())
    mode.change(lambda m: MODE_HELP.get(m, ""), mode, mode_help, api_visibility="private", queue=False)
    model.input(
        show_defaults,
        model,
        [steps, guidance, scheduler, cross_replace, self_replace],
        api_visibility="private",
    )
    gr.on(
        [generate.click, prompt.submit, edit_prompt.submit],
        run_p2p,
        form,
        [preview, compare, source_maps, edited_maps, info],
        concurrency_id=GPU_LANE,
        concurrency_limit=1,
        api_visibility="private",
    )
    stop.click(runs.cancel, None, None, queue=False, api_visibility="private")
    sharing.wire(inputs=form, outputs=field_list, settings_of=to_settings, to_form=to_form)
    on_message(bus, from_bus, field_list)

    api_only(api_p2p, "p2p")
    return P2PTab(
        fields=fields, generate=generate, compare=compare, maps=(source_maps, edited_maps), info=info
    )


def main() -> None:
    from .launch import run_alone

    run_alone(build, "Prompt-to-Prompt")


if __name__ == "__main__":
    main()
