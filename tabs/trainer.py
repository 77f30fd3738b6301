"""The Trainer tab: LoRA, DreamBooth with prior preservation, Textual Inversion, as jobs.

Start queues `Studio.start_training`: the job takes the model lane (generations wait for it,
and it for them) and outlives the browser. A timer polls the job's row, never on the GPU
lane: progress, the loss curve, the sample pictures every N steps. Cancel stops it at the
next step after writing a checkpoint; Resume continues a stopped job (cancelled, or cut off
by a crash) from its newest checkpoint in a new job. What a run makes is listed at once:
a LoRA by name in txt2img's LoRA box, an embedding by its word in any prompt, a DreamBooth
model in the model lists.

API (a hidden button, for gradio_client): `/train(settings)`, `settings` a TrainingSettings
dict or its JSON text (`images`: a folder on the server); runs the job, waits for it and
returns the job's result (output path, steps, loss, seconds, "job_id").

Run it alone with `python -m tabs.trainer`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import gradio as gr

from studio.settings import SettingsError
from studio.training.settings import (
    ATTENTION_TARGETS,
    CROPS,
    LR_SCHEDULES,
    METHODS,
    PRECISIONS,
    PRIOR_TARGETS,
    TrainingSettings,
)

from .common import Bus, api_only, on_message, progress_bar, row_id, table_value, user_errors, whole

POLL_SECONDS = 1.0
JOBS_SHOWN = 10
DEFAULTS = TrainingSettings(images="-")
STATUS_TEXT = {
    "queued": "queued: it starts when the model lane is free",
    "running": "running",
    "done": "done",
    "failed": "failed",
    "cancelled": "cancelled: its last checkpoint can be resumed",
    "interrupted": "interrupted: the studio stopped; its last checkpoint can be resumed",
}
USE_HINT = {
    "lora": "add `{name}:1.0` to txt2img's LoRA box",
    "textual-inversion": "write `{token}` in any prompt",
    "dreambooth": "pick `{name}` as the model",
}


@dataclass
class TrainerTab:
    fields: dict
    start: gr.Button
    cancel: gr.Button
    resume: gr.Button
    status: gr.Markdown


def build(studio, bus: Bus) -> TrainerTab:
    base_models = [s.name for s in studio.models.pipelines() if s.family == "sd"]

    with gr.Row():
        with gr.Column(scale=2):
            method = gr.Radio(
                list(METHODS),
                value=DEFAULTS.method,
                label="Method",
                info="lora with prior preservation is LoRA-DreamBooth; dreambooth tunes the whole UNet",
                elem_id="train-method",
            )
            model = gr.Dropdown(
                base_models,
                value=studio.default_model,
                allow_custom_value=True,
                label="Base model (SD 1.x / 2.x)",
                elem_id="train-model",
            )
            images = gr.Textbox(label="Pictures: a folder on this machine", elem_id="train-images")
            uploads = gr.File(
                label="or upload pictures (and same-name .txt captions)",
                file_count="multiple",
                file_types=["image", ".txt"],
                type="filepath",
                height=120,
                elem_id="train-uploads",
            )
            instance_prompt = gr.Textbox(
                value=DEFAULTS.instance_prompt,
                label="Instance prompt (captions of pictures without a .txt)",
                elem_id="train-instance-prompt",
            )
            with gr.Row():
                prior = gr.Checkbox(value=False, label="Prior preservation", elem_id="train-prior")
                class_prompt = gr.Textbox(
                    label="Class prompt (one per line for a regularisation set)",
                    placeholder="a shape",
                    lines=2,
                    elem_id="train-class-prompt",
                )
            with gr.Row():
                prior_weight = gr.Number(value=DEFAULTS.prior_weight, label="Prior weight λ")
                prior_target = gr.Dropdown(
                    list(PRIOR_TARGETS),
                    value=DEFAULTS.prior_target,
                    label="Prior target",
                    info="base-model: the frozen base model's prediction; class-pictures: the noise (Ruiz et al.)",
                    elem_id="train-prior-target",
                )
                class_images = gr.Number(
                    value=DEFAULTS.class_images,
                    precision=0,
                    label="Class pictures",
                    elem_id="train-class-images",
                )
            with gr.Row():
                steps = gr.Number(value=DEFAULTS.steps, precision=0, label="Steps", elem_id="train-steps")
                learning_rate = gr.Number(
                    value=DEFAULTS.learning_rate, label="Learning rate", elem_id="train-lr"
                )
                batch_size = gr.Number(value=DEFAULTS.batch_size, precision=0, label="Batch size")
            with gr.Row():
                rank = gr.Number(value=DEFAULTS.rank, precision=0, label="LoRA rank", elem_id="train-rank")
                alpha = gr.Number(value=DEFAULTS.alpha, label="LoRA alpha")
                name = gr.Textbox(label="Output name (empty: method-model)", elem_id="train-name")
            with gr.Row():
                seed = gr.Number(value=0, precision=0, label="Seed")
                checkpoint_every = gr.Number(
                    value=DEFAULTS.checkpoint_every, precision=0, label="Checkpoint every"
                )
                sample_every = gr.Number(
                    value=DEFAULTS.sample_every,
                    precision=0,
                    label="Samples every",
                    elem_id="train-sample-every",
                )
            with gr.Accordion("More settings", open=False):
                targets = gr.Textbox(
                    value=", ".join(ATTENTION_TARGETS),
                    label="LoRA target modules",
                    info="e.g. add proj_in, proj_out, ff.net.0.proj, ff.net.2, conv1, conv2",
                )
                train_text_encoder = gr.Checkbox(value=False, label="Train the text encoder too")
                with gr.Row():
                    token = gr.Textbox(value=DEFAULTS.token, label="Textual inversion: new word")
                    initializer = gr.Textbox(value=DEFAULTS.initializer, label="… starting from the word")
                with gr.Row():
                    resolution = gr.Number(value=0, precision=0, label="Resolution (0: the model's)")
                    crop = gr.Radio(list(CROPS), value=DEFAULTS.crop, label="Crop")
                    flip = gr.Checkbox(value=False, label="Random mirror")
                with gr.Row():
                    lr_schedule = gr.Dropdown(
                        list(LR_SCHEDULES), value=DEFAULTS.lr_schedule, label="LR schedule"
                    )
                    warmup_steps = gr.Number(value=0, precision=0, label="Warm-up steps")
                    accumulation = gr.Number(value=1, precision=0, label="Gradient accumulation")
                with gr.Row():
                    mixed_precision = gr.Radio(list(PRECISIONS), value="no", label="Mixed precision (GPU)")
                    checkpointing = gr.Checkbox(value=False, label="Gradient checkpointing")
                sample_prompt = gr.Textbox(label="Sample prompt (empty: the instance prompt)")
            with gr.Row():
                start = gr.Button("Start training", variant="primary", elem_id="train-start")
                cancel = gr.Button("Cancel", variant="stop", elem_id="train-cancel")
                resume = gr.Button("Resume", elem_id="train-resume")
        with gr.Column(scale=3):
            status = gr.Markdown("No training yet.", elem_id="train-status")
            progress = gr.HTML(progress_bar(0.0), elem_id="train-progress")
            loss = gr.LinePlot(x="step", y="loss", title="Loss", height=260, elem_id="train-loss")
            samples = gr.Gallery(
                label="Samples (newest first)",
                columns=2,
                height="auto",
                interactive=False,
                elem_id="train-samples",
            )
            jobs = gr.Dataframe(
                label="Training jobs (pick one to follow it)", interactive=False, elem_id="train-jobs"
            )

    watched = gr.State(None)  # the job this page follows; None: the latest
    shown = gr.State({})
    timer = gr.Timer(POLL_SECONDS)

    fields = {
        "method": method,
        "model": model,
        "images": images,
        "instance_prompt": instance_prompt,
        "class_prompt": class_prompt,
        "prior_preservation": prior,
        "prior_weight": prior_weight,
        "prior_target": prior_target,
        "class_images": class_images,
        "steps": steps,
        "learning_rate": learning_rate,
        "batch_size": batch_size,
        "gradient_accumulation": accumulation,
        "lr_schedule": lr_schedule,
        "warmup_steps": warmup_steps,
        "rank": rank,
        "alpha": alpha,
        "targets": targets,
        "train_text_encoder": train_text_encoder,
        "token": token,
        "initializer": initializer,
        "resolution": resolution,
        "crop": crop,
        "flip": flip,
        "mixed_precision": mixed_precision,
        "gradient_checkpointing": checkpointing,
        "seed": seed,
        "checkpoint_every": checkpoint_every,
        "sample_every": sample_every,
        "sample_prompt": sample_prompt,
        "name": name,
    }
    form = {*fields.values(), uploads}

    # ---- widgets <-> settings ------------------------------------------------------------

    def to_settings(data: dict) -> TrainingSettings:
        values = {key: data[widget] for key, widget in fields.items()}
        for key in (
            "images",
            "instance_prompt",
            "class_prompt",
            "token",
            "initializer",
            "sample_prompt",
            "name",
        ):
            values[key] = values[key] or ""  # a box never shown (a closed accordion) sends None
        values["targets"] = tuple(t.strip() for t in (values["targets"] or "").split(",") if t.strip())
        values["resolution"] = values["resolution"] or None
        for key in (
            "steps",
            "batch_size",
            "gradient_accumulation",
            "warmup_steps",
            "rank",
            "class_images",
            "seed",
            "checkpoint_every",
            "sample_every",
        ):
            values[key] = whole(key.replace("_", " "), values[key], required=True)
        if data.get(uploads):
            values["images"] = str(studio.collect_training_uploads(data[uploads]))
        return TrainingSettings(**values)

    def to_form(s: TrainingSettings) -> dict:
        values = {fields[k]: getattr(s, k) for k in fields}
        values[targets] = ", ".join(s.targets)
        values[resolution] = s.resolution or 0
        return values

    # ---- what the page shows --------------------------------------------------------------

    def status_line(state) -> str:
        if state is None:
            return "No training yet: choose pictures and start one."
        line = f"**Training job #{state.id}** {STATUS_TEXT[state.status]}"
        if state.message and state.status in ("queued", "running"):
            line += f" · {state.message}"
        if state.status == "done":
            result, settings = state.result, state.settings
            hint = USE_HINT[settings["method"]].format(
                name=settings.get("name")
                or result.get("installed", "").rsplit("/", 1)[-1].removesuffix(".safetensors"),
                token=settings.get("token"),
            )
            line += f" in {result.get('seconds', 0):g} s · `{result.get('installed')}` · {hint}"
            line += f"\n\n{result.get('pictures', '')}"
        if state.error:
            line += f": {state.error}"
        return line

    def loss_value(state):
        import pandas as pd

        rows = [m for m in (state.metrics if state else ()) if "loss" in m]
        return pd.DataFrame({"step": [m["step"] for m in rows], "loss": [m["loss"] for m in rows]})

    def jobs_value(states) -> dict:
        rows = [
            [
                s.id,
                s.status,
                f"{round(100 * s.fraction)}%",
                s.settings.get("method"),
                s.settings.get("model"),
                s.settings.get("instance_prompt"),
                s.created_at.replace("T", " ")[:19],
                s.error,
            ]
            for s in states
        ]
        headers = ["job", "status", "done", "method", "model", "instance prompt", "started (UTC)", "error"]
        return table_value(headers, rows)

    def current(job_id):
        if job_id is not None:
            return studio.jobs.get(job_id)
        recent = studio.jobs.list("training", 1)
        return recent[0] if recent else None

    # ---- events ----------------------------------------------------------------------------

    def poll(job_id, seen):
        recent = studio.jobs.list("training", JOBS_SHOWN)
        state = current(job_id)
        out = {status: status_line(state), progress: progress_bar(state.fraction if state else 0.0)}
        key = [state.id, state.status, state.step, len(state.samples)] if state else None
        if key != seen.get("job"):
            out[loss] = loss_value(state)
            out[samples] = studio.training_samples(state) if state else []
        jobs_key = [[s.id, s.status] for s in recent]
        if jobs_key != seen.get("jobs"):
            out[jobs] = jobs_value(recent)
        out[shown] = {"job": key, "jobs": jobs_key}
        out[timer] = gr.Timer(active=any(not s.finished for s in [*recent, *([state] if state else [])]))
        return out

    @user_errors
    def start_job(data: dict):
        job = studio.start_training(to_settings(data))
        return {
            watched: job,
            shown: {},
            timer: gr.Timer(active=True),
            status: f"**Training job #{job}** queued",
        }

    @user_errors
    def cancel_job(job_id):
        state = current(job_id)
        if state is None or state.finished:
            raise SettingsError("no training is running")
        studio.jobs.cancel(state.id)
        return f"**Training job #{state.id}** cancelling at the next step…"

    @user_errors
    def resume_job(job_id):
        state = current(job_id)
        if state is None:
            raise SettingsError("no training job to resume")
        job = studio.resume_training(state.id)
        return {
            watched: job,
            shown: {},
            timer: gr.Timer(active=True),
            status: f"**Training job #{job}** queued",
        }

    def follow_job(evt: gr.SelectData):
        job_id = row_id(evt)
        if job_id is None:
            return gr.skip()
        state = studio.jobs.get(job_id)
        return {
            watched: job_id,
            shown: {},
            timer: gr.Timer(active=True),
            **to_form(TrainingSettings.from_dict(state.settings)),
        }

    def from_bus(message):
        if not message or message.get("target") != "trainer" or not message.get("settings"):
            return gr.skip()
        try:
            return to_form(TrainingSettings.from_dict(message["settings"]))
        except SettingsError as exc:
            gr.Warning(f"Those settings could not be restored: {exc}")
            return gr.skip()

    @user_errors
    def api_train(settings):
        if isinstance(settings, str):
            try:
                settings = json.loads(settings)
            except ValueError:
                raise SettingsError("the settings are not valid JSON") from None
        job = studio.start_training(TrainingSettings.from_dict(settings))
        state = studio.jobs.wait(job)
        if state.status != "done":
            raise gr.Error(status_line(state).replace("**", ""), print_exception=False)
        return {**state.result, "job_id": job}

    # ---- wiring ----------------------------------------------------------------------------

    private = dict(api_visibility="private", concurrency_limit=None)
    field_list = list(fields.values())
    start.click(start_job, form, [watched, shown, timer, status], **private)
    cancel.click(cancel_job, watched, status, **private)
    resume.click(resume_job, watched, [watched, shown, timer, status], **private)
    timer.tick(
        poll,
        [watched, shown],
        [status, progress, loss, samples, jobs, shown, timer],
        show_progress="hidden",
        **private,
    )
    jobs.select(follow_job, None, [watched, shown, timer, *field_list], **private)
    on_message(bus, from_bus, field_list, concurrency_limit=None)

    api_only(api_train, "train", pictures=False)
    return TrainerTab(fields=fields, start=start, cancel=cancel, resume=resume, status=status)


def main() -> None:
    from .launch import run_alone

    run_alone(build, "Trainer")


if __name__ == "__main__":
    main()
