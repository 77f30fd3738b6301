"""The Evaluation tab: models × one settings axis, scored by toy GenEval, CLIP-Score, FID, ...

Start queues `Studio.start_evaluation` as a job: no model runs in the event itself (the job
takes the model lane), so the page shows it "queued" while a generation finishes. A timer
polls the job's row (never on the GPU lane) for progress; Cancel stops it within a step.
The job outlives the browser: a reopened page shows the latest job, and the jobs table
lists the others. When a job is done: the plots (X/Y grid, score against the axis, toy
GenEval per category), the numbers and the run's notes (FID's small-N warning among them).
Past evaluations come from the gallery; picking one shows its numbers and plots.
Instead of generating, the tab scores a folder of PNGs or gallery pictures by id (the gallery's
"Send to evaluation" adds the shown picture's id).

API (a hidden button, for gradio_client): `/evaluate(settings)`, `settings` an
EvaluationSettings dict or its JSON text; runs the job, waits for it, and returns the
figures (images) and the job's result (results.json's numbers, "notes", "figures",
"evaluation_id", "seconds", "job_id").

Run it alone with `python -m tabs.evaluation`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from studio.evaluate import AXES, FID_FEATURES, METRICS, PROMPT_SETS, EvaluationSettings, results_table
from studio.models import PIPELINES
from studio.schedulers import scheduler_names
from studio.settings import SettingsError

from .common import Bus, api_only, on_message, progress_bar, row_id, table_value, user_errors, whole
from .txt2img import MODEL_DEFAULT

AXIS_EXAMPLES = {
    "guidance": "1, 3, 5, 7",
    "steps": "10, 25",
    "scheduler": "DDIM, Euler, UniPC",
    "lora": "0, 0.5, 1",
}
POLL_SECONDS = 1.0
JOBS_SHOWN = 10
MAX_PROMPT_FILE = 1 << 20
STATUS_TEXT = {
    "queued": "queued: it starts when the model lane is free",
    "running": "running",
    "done": "done",
    "failed": "failed",
    "cancelled": "cancelled: nothing was stored",
    "interrupted": "interrupted: the studio stopped before it finished",
}


@dataclass
class EvaluationTab:
    fields: dict  # settings field name -> component
    start: gr.Button
    cancel: gr.Button
    status: gr.Markdown
    plots: gr.Gallery
    table: gr.Dataframe


def read_prompts(text: str, path: str | None) -> tuple[str, ...]:
    """The custom prompts: the uploaded .txt file's lines, else the text box's."""
    if path:
        file = Path(path)
        if file.stat().st_size > MAX_PROMPT_FILE:
            raise SettingsError("the prompt file is over 1 MB: one prompt a line, at most 10000")
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise SettingsError(
                "the prompt file is not UTF-8 text: give a .txt with one prompt a line"
            ) from None
    return tuple(line.strip() for line in (text or "").splitlines() if line.strip())


def split_values(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in (text or "").split(",") if v.strip())


def gallery_ids(text: str) -> tuple[int, ...]:
    """Gallery ids typed as "3, 4, 5" (or sent from the gallery, one at a time)."""
    ids = []
    for part in split_values((text or "").replace(" ", ",")):
        if not part.lstrip("#").isdigit():
            raise SettingsError(f"gallery ids are whole numbers like 3, 4, 5, not {part!r}")
        ids.append(int(part.lstrip("#")))
    if not ids:
        raise SettingsError(
            "give the gallery ids of the pictures to score (e.g. 3, 4, 5), or send them from the gallery"
        )
    return tuple(ids)


def _given(value, default):
    """An empty number box means the default."""
    return default if value is None else value


def axis_text(settings: dict) -> str:
    """A run's axis and values for the job and past-evaluation lists, naming its LoRA (or,
    scoring a folder, the folder)."""
    if settings.get("images"):
        return f"pictures in {settings['images']}"
    if settings.get("gallery_ids"):
        return f"gallery pictures {', '.join(map(str, settings['gallery_ids']))}"
    text = f"{settings.get('axis')} {', '.join(settings.get('values', ()))}"
    return f"{text} of {settings['lora']}" if settings.get("lora") else text


def notes_text(notes) -> str:
    return "\n".join(f"- ⚠️ {note}" for note in notes)


def build(studio, bus: Bus) -> EvaluationTab:
    models = studio.models
    base_models = [s.name for s in models.pipelines() if "txt2img" in PIPELINES.get(s.family, {})]

    with gr.Row():
        with gr.Column(scale=2):
            mode = gr.Radio(
                ["generate", "pictures", "gallery"],
                value="generate",
                label="Score",
                info="generate: models × a settings axis; pictures: a folder of PNGs as they are; "
                "gallery: gallery pictures by id",
                elem_id="eval-mode",
            )
            images = gr.Textbox(
                label="Folder of PNG pictures (each scored against the prompt its metadata records)",
                visible=False,
                elem_id="eval-images",
            )
            gallery_box = gr.Textbox(
                label="Gallery ids (each scored against its recorded prompt; the gallery's "
                "'Send to evaluation' adds one)",
                placeholder="3, 4, 5",
                visible=False,
                elem_id="eval-gallery-ids",
            )
            metrics = gr.CheckboxGroup(
                list(METRICS),
                value=["toy-geneval", "clip-score"],
                label="Metrics",
                info="imagereward, hpsv2 and pickscore need their weights on disk (a missing one is named)",
                elem_id="eval-metrics",
            )
            model_list = gr.Dropdown(
                base_models,
                value=[studio.default_model],
                multiselect=True,
                allow_custom_value=True,
                label="Models",
                info="catalog names, local diffusers folders or hub ids",
                elem_id="eval-models",
            )
            prompt_set = gr.Radio(
                list(PROMPT_SETS),
                value="toy-geneval",
                label="Prompt set",
                info="toy-geneval scores only its own prompts",
                elem_id="eval-prompt-set",
            )
            per_category = gr.Number(
                value=12, precision=0, label="Toy GenEval prompts per category", elem_id="eval-per-category"
            )
            prompts = gr.Textbox(
                label="Custom prompts, one a line", lines=4, visible=False, elem_id="eval-prompts"
            )
            prompt_file = gr.File(
                label="or a .txt file of prompts",
                file_types=[".txt"],
                type="filepath",
                height=120,
                visible=False,
                elem_id="eval-prompt-file",
            )
            with gr.Row():
                axis = gr.Radio(list(AXES), value="guidance", label="Axis", elem_id="eval-axis")
                values = gr.Textbox(
                    value=AXIS_EXAMPLES["guidance"], label="Values, comma separated", elem_id="eval-values"
                )
            lora = gr.Dropdown(
                [spec.name for spec in models.loras()],
                value=None,
                allow_custom_value=True,
                label="LoRA whose weight the axis sets (0: without it)",
                info="the library's LoRAs, trained ones included, or a .safetensors file",
                visible=False,
                elem_id="eval-lora",
            )
            with gr.Row():
                samples = gr.Number(value=1, precision=0, label="Seeds per prompt", elem_id="eval-samples")
                seed = gr.Number(value=0, precision=0, label="First seed", elem_id="eval-seed")
                steps = gr.Number(value=0, precision=0, label="Steps (0: the model's)", elem_id="eval-steps")
            with gr.Accordion("More settings", open=False, elem_id="eval-more"):
                with gr.Row():
                    guidance = gr.Number(value=None, label="Guidance (empty: the model's)")
                    scheduler = gr.Dropdown(
                        [MODEL_DEFAULT] + scheduler_names(), value=MODEL_DEFAULT, label="Sampler"
                    )
                clip_model = gr.Textbox(
                    value=EvaluationSettings.clip_model,
                    label="CLIP model for CLIP-Score and FID features (a folder)",
                )
                reference = gr.Textbox(
                    label="FID reference folder (empty: 2,000 toy-world renders)", elem_id="eval-reference"
                )
                fid_features = gr.Radio(
                    list(FID_FEATURES),
                    value="auto",
                    label="FID features",
                    info="auto: Inception-V3 once `python -m studio convert-inception` installed its "
                    "weights, else the CLIP model's (a different feature space, so labelled)",
                    elem_id="eval-fid-features",
                )
            with gr.Row():
                start = gr.Button("Start evaluation", variant="primary", elem_id="eval-start")
                cancel = gr.Button("Cancel", variant="stop", elem_id="eval-cancel")
        with gr.Column(scale=3):
            status = gr.Markdown("No evaluation yet.", elem_id="eval-status")
            progress = gr.HTML(progress_bar(0.0), elem_id="eval-progress")
            notes = gr.Markdown(elem_id="eval-notes")
            plots = gr.Gallery(
                label="Plots",
                format="png",
                columns=2,
                height="auto",
                object_fit="contain",
                interactive=False,
                elem_id="eval-plots",
            )
            table = gr.Dataframe(label="Numbers", interactive=False, elem_id="eval-table")
            jobs = gr.Dataframe(
                label="Evaluation jobs (pick one to follow it)", interactive=False, elem_id="eval-jobs"
            )
            past = gr.Dataframe(
                label="Past evaluations (pick one to see it)", interactive=False, elem_id="eval-past"
            )
            load_settings = gr.Button("Load the picked evaluation's settings", size="sm")

    watched = gr.State(None)  # the job this page follows; None: the latest
    shown = gr.State({})  # what the page shows, so that a poll sends only what changed
    picked = gr.State(None)  # the settings of the past evaluation picked
    timer = gr.Timer(POLL_SECONDS)

    fields = {
        "mode": mode,
        "images": images,
        "gallery_ids": gallery_box,
        "metrics": metrics,
        "models": model_list,
        "prompt_set": prompt_set,
        "prompts": prompts,
        "prompt_file": prompt_file,
        "per_category": per_category,
        "axis": axis,
        "values": values,
        "lora": lora,
        "samples": samples,
        "seed": seed,
        "steps": steps,
        "guidance": guidance,
        "scheduler": scheduler,
        "clip_model": clip_model,
        "reference": reference,
        "fid_features": fid_features,
    }
    form = set(fields.values())

    # ---- widgets <-> settings ------------------------------------------------------------

    def to_settings(data: dict) -> EvaluationSettings:
        v = {name: data[component] for name, component in fields.items()}
        folder = None
        if v["mode"] == "pictures":
            folder = (v["images"] or "").strip()
            if not folder:
                raise SettingsError(
                    "give the folder of pictures to score (PNGs whose metadata has their prompt)"
                )
        return EvaluationSettings(
            images=folder,
            gallery_ids=gallery_ids(v["gallery_ids"]) if v["mode"] == "gallery" else (),
            fid_features=v["fid_features"] or "auto",
            metrics=tuple(v["metrics"] or ()),
            models=tuple(v["models"] or ()),
            prompt_set=v["prompt_set"] or "toy-geneval",
            prompts=read_prompts(v["prompts"], v["prompt_file"]) if v["prompt_set"] == "custom" else (),
            per_category=_given(whole("prompts per category", v["per_category"]), 12),
            axis=v["axis"] or "guidance",
            values=split_values(v["values"]),
            lora=(v["lora"] or "").strip() if v["axis"] == "lora" else "",
            samples=_given(whole("seeds per prompt", v["samples"]), 1),
            seed=_given(whole("seed", v["seed"]), 0),
            steps=whole("steps", v["steps"]) or None,
            guidance=None if v["guidance"] is None else float(v["guidance"]),
            scheduler=None if v["scheduler"] in (None, MODEL_DEFAULT) else v["scheduler"],
            clip_model=(v["clip_model"] or "").strip() or EvaluationSettings.clip_model,
            reference=(v["reference"] or "").strip() or None,
        )

    def to_form(s: EvaluationSettings) -> dict:
        values_ = {
            "mode": "gallery" if s.gallery_ids else "generate" if s.images is None else "pictures",
            "images": s.images or "",
            "gallery_ids": ", ".join(map(str, s.gallery_ids)),
            "metrics": list(s.metrics),
            "models": list(s.models),
            "prompt_set": s.prompt_set,
            "prompts": "\n".join(s.prompts),
            "prompt_file": None,
            "per_category": s.per_category,
            "axis": s.axis,
            "values": ", ".join(s.values),
            "lora": s.lora or None,
            "samples": s.samples,
            "seed": s.seed,
            "steps": s.steps or 0,
            "guidance": s.guidance,
            "scheduler": s.scheduler or MODEL_DEFAULT,
            "clip_model": s.clip_model,
            "reference": s.reference or "",
            "fid_features": s.fid_features,
        }
        return {fields[name]: value for name, value in values_.items()}

    # ---- what a job or a stored evaluation looks like ---------------------------------------

    def figures_of(evaluation) -> list[tuple[str, str]]:
        items = [studio.gallery.get(i) for i in evaluation.figure_ids]
        return [(item.image_path, item.prompt) for item in items if item is not None]

    def show_evaluation(evaluation) -> dict:
        return {
            plots: figures_of(evaluation),
            table: table_value(*results_table(evaluation.settings, evaluation.results)),
            notes: notes_text(evaluation.results.get("notes", ())),
        }

    def status_line(state) -> str:
        if state is None:
            return "No evaluation yet: choose the settings and start one."
        line = f"**Evaluation job #{state.id}** {STATUS_TEXT[state.status]}"
        if state.status == "running" and state.message:
            line += f" · {state.message}"
        if state.status == "done":
            line += (
                f" in {state.result.get('seconds', 0):g} s · evaluation #{state.result.get('evaluation_id')}"
            )
        if state.error:
            line += f": {state.error}"
        return line

    def show_job(state) -> dict:
        if state is not None and state.status == "done":
            return show_evaluation(studio.gallery.evaluation(state.result["evaluation_id"]))
        return {plots: [], table: table_value(["model"], []), notes: ""}

    def jobs_value(states) -> dict:
        rows = [
            [
                s.id,
                s.status,
                f"{round(100 * s.fraction)}%",
                "pictures"
                if s.settings.get("images") or s.settings.get("gallery_ids")
                else ", ".join(s.settings.get("models", ())),
                axis_text(s.settings),
                s.created_at.replace("T", " ")[:19],
                s.error,
            ]
            for s in states
        ]
        return table_value(["job", "status", "done", "models", "axis", "started (UTC)", "error"], rows)

    def past_value() -> dict:
        rows = [
            [
                e.id,
                e.created_at.strftime("%Y-%m-%d %H:%M"),
                ", ".join(e.settings.get("models", ())),
                ", ".join(e.settings.get("metrics", ())),
                axis_text(e.settings),
                e.results.get("samples per cell", ""),
                round(e.duration_s, 1),
            ]
            for e in studio.gallery.evaluations(limit=50)
        ]
        headers = ["evaluation", "when (UTC)", "models", "metrics", "axis", "samples a cell", "seconds"]
        return table_value(headers, rows)

    # ---- events ----------------------------------------------------------------------------

    def poll(job_id, seen):
        """The followed job's progress; its results, the job list and the past evaluations
        only when they changed. The timer stops once no job is unfinished."""
        recent = studio.jobs.list("evaluation", JOBS_SHOWN)
        state = studio.jobs.get(job_id) if job_id is not None else (recent[0] if recent else None)
        out = {status: status_line(state), progress: progress_bar(state.fraction if state else 0.0)}
        job_key = [state.id, state.status] if state else None
        jobs_key = [[s.id, s.status] for s in recent]
        if job_key != seen.get("job"):
            out.update(show_job(state))
        if jobs_key != seen.get("jobs"):
            out[jobs] = jobs_value(recent)
            out[past] = past_value()
        out[shown] = {"job": job_key, "jobs": jobs_key}
        out[timer] = gr.Timer(active=any(not s.finished for s in [*recent, *([state] if state else [])]))
        return out

    @user_errors
    def start_job(data: dict):
        job = studio.start_evaluation(to_settings(data))
        return {
            watched: job,
            timer: gr.Timer(active=True),
            status: f"**Evaluation job #{job}** {STATUS_TEXT['queued']}",
            progress: progress_bar(0.0),
        }

    @user_errors
    def cancel_job(job_id):
        recent = studio.jobs.list("evaluation", 1)
        state = studio.jobs.get(job_id) if job_id is not None else (recent[0] if recent else None)
        if state is None or state.finished:
            raise SettingsError("no evaluation is running")
        studio.jobs.cancel(state.id)
        return f"**Evaluation job #{state.id}** cancelling…"

    def follow_job(evt: gr.SelectData):
        job_id = row_id(evt)
        if job_id is None:
            return gr.skip()
        return {watched: job_id, shown: {}, timer: gr.Timer(active=True)}

    @user_errors
    def pick_evaluation(evt: gr.SelectData):
        evaluation_id = row_id(evt)
        if evaluation_id is None:
            return gr.skip()
        evaluation = studio.gallery.evaluation(evaluation_id)
        line = f"**Evaluation #{evaluation.id}** of {evaluation.created_at:%Y-%m-%d %H:%M} UTC"
        return {**show_evaluation(evaluation), picked: evaluation.settings, status: line, progress: ""}

    @user_errors
    def load_picked(settings):
        if not settings:
            raise SettingsError("pick a past evaluation first")
        return to_form(EvaluationSettings.from_dict(settings))

    def show_prompt_widgets(choice):
        custom = choice == "custom"
        return {
            prompts: gr.update(visible=custom),
            prompt_file: gr.update(visible=custom),
            per_category: gr.update(visible=choice == "toy-geneval"),
        }

    def from_bus(message, ids_text):
        """Settings restored into the form, or a gallery picture sent here: its id is added."""
        if not message or message.get("target") != "evaluation":
            return gr.skip()
        if not message.get("settings"):
            if message.get("image_id") is None:
                return gr.skip()
            known = [part for part in split_values((ids_text or "").replace(" ", ",")) if part]
            ids = list(dict.fromkeys([*known, str(message["image_id"])]))
            return {mode: "gallery", gallery_box: ", ".join(ids)}
        try:
            return to_form(EvaluationSettings.from_dict(message["settings"]))
        except SettingsError as exc:
            gr.Warning(f"Those settings could not be restored: {exc}")
            return gr.skip()

    @user_errors
    def api_evaluate(settings):
        if isinstance(settings, str):
            try:
                settings = json.loads(settings)
            except ValueError:
                raise SettingsError("the settings are not valid JSON") from None
        job = studio.start_evaluation(EvaluationSettings.from_dict(settings))
        state = studio.jobs.wait(job)
        if state.status != "done":
            raise gr.Error(status_line(state).replace("**", ""), print_exception=False)
        evaluation = studio.gallery.evaluation(state.result["evaluation_id"])
        return figures_of(evaluation), {**state.result, "job_id": job}

    # ---- wiring ----------------------------------------------------------------------------

    field_list = list(fields.values())
    private = dict(api_visibility="private", concurrency_limit=None)
    prompt_set.change(
        show_prompt_widgets, prompt_set, [prompts, prompt_file, per_category], queue=False, **private
    )
    axis.input(lambda a: AXIS_EXAMPLES.get(a, ""), axis, values, queue=False, **private)
    axis.change(lambda a: gr.update(visible=a == "lora"), axis, lora, queue=False, **private)
    mode.change(
        lambda m: (gr.update(visible=m == "pictures"), gr.update(visible=m == "gallery")),
        mode,
        [images, gallery_box],
        queue=False,
        **private,
    )
    # read when focused, so that a LoRA the Trainer just installed is offered
    lora.focus(
        lambda: gr.update(choices=[spec.name for spec in models.loras()]), None, lora, queue=False, **private
    )
    start.click(start_job, form, [watched, timer, status, progress], **private)
    cancel.click(cancel_job, watched, status, **private)
    outputs = [status, progress, plots, table, notes, jobs, past, shown, timer]
    timer.tick(poll, [watched, shown], outputs, show_progress="hidden", **private)
    jobs.select(follow_job, None, [watched, shown, timer], **private)
    past.select(pick_evaluation, None, [plots, table, notes, picked, status, progress], **private)
    load_settings.click(load_picked, picked, field_list, **private)
    on_message(bus, from_bus, field_list, inputs=(gallery_box,), concurrency_limit=None)

    api_only(api_evaluate, "evaluate")
    return EvaluationTab(fields=fields, start=start, cancel=cancel, status=status, plots=plots, table=table)


def main() -> None:
    from .launch import run_alone

    run_alone(build, "Evaluation")


if __name__ == "__main__":
    main()
