"""Evaluation: generate a prompt set over models × one settings axis, then score the images.

Metrics (see `studio.metrics` for the formulas):
- toy-geneval: the toy GenEval prompt set judged by the toy-world judge (Ghosh et al. 2023's
  categories), per category and overall;
- clip-score: 100 · max(cos, 0) between image and prompt embeddings of a CLIP model (the toy
  CLIP offline, a real one given as `clip_model` where it is on disk);
- fid: Fréchet distance between the generated images' features and a reference set's (a
  folder, or for toy models 2,000 fresh toy-world renders), over Inception-V3's pool3
  features with torch-fidelity's conventions (`studio.inception`) where its weights were
  converted into the library's metrics folder, else over that CLIP's image embeddings, so
  labelled: not Inception's FID (`fid_features` forces one or the other);
- imagereward, pickscore, hpsv2 (`studio.preference`): human-preference models, the mean over
  the pictures; one without its weights on disk is refused with what is missing.
The axis is guidance, steps, sampler or the weight of one LoRA (`lora`: a catalog name, trained
ones included, or a .safetensors file; weight 0 generates without it).
With `images` (a folder of PNGs) or `gallery_ids` (gallery pictures) nothing is generated: the
pictures are scored as one cell, each against the prompt its PNG metadata (or its gallery
record) holds (`score_pictures`).
Every cell (model, axis value) draws `samples` seeds per prompt, seeds seed..seed+samples-1,
the same in every cell, in batches through the model manager's pipeline.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import preference
from .inception import SPACE as INCEPTION_SPACE
from .inception import WEIGHTS_NAME as INCEPTION_WEIGHTS
from .models import REPO_ROOT, LoraRef, ModelError, ModelManager
from .settings import Settings, SettingsError, check_float, check_int
from .toyworld.geneval import MAX_PER_CATEGORY

METRICS = ("toy-geneval", "clip-score", "fid", "imagereward", "hpsv2", "pickscore")
AXES = ("guidance", "steps", "scheduler", "lora")
LORA_WEIGHTS = (-4.0, 4.0)  # as txt2img allows
PROMPT_SETS = ("toy-geneval", "general", "custom")
FID_FEATURES = ("auto", "inception", "clip")  # auto: Inception-V3 where its weights are, else CLIP
MAX_PICTURES = 10_000
GENERAL_PROMPTS = (
    "a red circle on the left",
    "a large blue square on a white background",
    "a green triangle above a yellow circle",
    "two purple squares on a black background",
    "an astronaut riding a horse on the moon",
    "a bowl of ramen, studio photograph",
    "a watercolour painting of a lighthouse at dusk",
    "a close-up portrait of an old fisherman, 85mm",
)
BATCH = 32
REFERENCE_RENDERS = 2000


@dataclass(frozen=True)
class EvaluationSettings(Settings):
    technique = "evaluate"
    schema_version = 1

    metrics: tuple[str, ...] = ("toy-geneval", "clip-score")
    models: tuple[str, ...] = ("toy-sd",)
    prompt_set: str = "toy-geneval"
    prompts: tuple[str, ...] = ()  # the custom set (a file's lines)
    axis: str = "guidance"
    values: tuple[str, ...] = ("4",)
    samples: int = 1  # seeds per prompt
    seed: int = 0
    steps: int | None = None  # the settings not on the axis: None, each model's default
    guidance: float | None = None
    scheduler: str | None = None
    per_category: int = 12  # toy GenEval prompts per category
    clip_model: str = str(REPO_ROOT / "assets" / "models" / "toy-clip")
    reference: str | None = None  # a folder of reference images for FID
    lora: str = ""  # the LoRA whose weight the "lora" axis sets (a catalog name or .safetensors file)
    images: str | None = None  # a folder of PNGs to score instead of generating (the fields above unused)
    fid_features: str = "auto"  # inception, clip, or auto: Inception-V3 where its weights are, else CLIP
    gallery_ids: tuple[int, ...] = ()  # gallery pictures to score instead of generating

    def __post_init__(self):
        if not self.metrics:
            raise SettingsError("choose at least one metric")
        for metric in self.metrics:
            if metric not in METRICS:
                raise SettingsError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
        if self.fid_features not in FID_FEATURES:
            raise SettingsError(
                f"FID features must be one of {', '.join(FID_FEATURES)}, not {self.fid_features!r}"
            )
        if self.gallery_ids:
            if self.images is not None:
                raise SettingsError("score a folder of pictures or gallery pictures, not both")
            if len(self.gallery_ids) > MAX_PICTURES:
                raise SettingsError(f"at most {MAX_PICTURES} gallery pictures, not {len(self.gallery_ids)}")
            for item_id in self.gallery_ids:
                check_int("a gallery id", item_id, 1, 2**63 - 1)
            return  # scoring gallery pictures: the models, prompts and grid are not used
        if self.images is not None:
            if not isinstance(self.images, str) or not self.images.strip():
                raise SettingsError(
                    "give the folder of pictures to score (PNGs whose metadata has their prompt)"
                )
            return  # scoring pictures: the models, prompts and grid are not used
        if not self.models or not all(isinstance(m, str) and m.strip() for m in self.models):
            raise SettingsError("choose at least one model")
        if self.prompt_set not in PROMPT_SETS:
            raise SettingsError(
                f"prompt set must be one of {', '.join(PROMPT_SETS)}, not {self.prompt_set!r}"
            )
        if self.prompt_set == "custom" and not self.prompts:
            raise SettingsError("the custom prompt set is empty: give a file with one prompt a line")
        if "toy-geneval" in self.metrics and self.prompt_set != "toy-geneval":
            raise SettingsError("toy-geneval scores its own prompt set: choose the toy-geneval prompts")
        if self.axis not in AXES:
            raise SettingsError(f"the grid axis must be one of {', '.join(AXES)}, not {self.axis!r}")
        if not isinstance(self.lora, str):
            raise SettingsError("lora must be text: a LoRA's catalog name or .safetensors file")
        if self.axis == "lora" and not self.lora.strip():
            raise SettingsError(
                "the lora axis needs a LoRA: name one (a catalog name or a .safetensors file) "
                "and give its weights as the values"
            )
        if self.lora.strip() and self.axis != "lora":
            raise SettingsError(
                f"a LoRA is evaluated over the lora axis (its weights as the values), not over {self.axis}: "
                "choose the lora axis or leave the LoRA empty"
            )
        if not self.values:
            raise SettingsError(f"give at least one {value_name(self.axis)}")
        for value in self.values:
            axis_value(self.axis, value)
        check_int("samples", self.samples, 1, 64)
        check_int("seed", self.seed, 0, 2**32 - 1)
        check_int("steps", self.steps, 1, 150)
        check_float("guidance", self.guidance, 0.0, 30.0)
        check_int("prompts per category", self.per_category, 1, MAX_PER_CATEGORY)
        if len(self.prompts) > 10_000:
            raise SettingsError(f"at most 10000 prompts, not {len(self.prompts)}")

    @property
    def prompt(self) -> str:
        return f"evaluation of {', '.join(self.models)}"

    @property
    def scores_pictures(self) -> bool:
        """Whether existing pictures (a folder or gallery items) are scored, not generated ones."""
        return self.images is not None or bool(self.gallery_ids)


def value_name(axis: str) -> str:
    return "LoRA weight" if axis == "lora" else f"{axis} value"


def axis_value(axis: str, text: str):
    """A grid value as the type its setting takes."""
    if axis == "scheduler":
        return text  # a scheduler name, checked when the model is known
    try:
        value = int(text) if axis == "steps" else float(text)
    except ValueError:
        raise SettingsError(f"{value_name(axis)} {text!r} is not a number") from None
    if axis == "steps":
        check_int("steps", value, 1, 150)
    elif axis == "lora":
        check_float("LoRA weight", value, *LORA_WEIGHTS)
    else:
        check_float("guidance", value, 0.0, 30.0)
    return value


@dataclass
class Cell:
    model: str
    value: str
    scores: dict = field(default_factory=dict)  # metric -> number
    per_category: dict = field(default_factory=dict)  # toy GenEval categories
    images: list = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class EvaluationReport:
    settings: EvaluationSettings
    cells: list[Cell]
    notes: list[str]
    seconds: float
    figures: dict = field(default_factory=dict)

    def save(self, out_dir: Path) -> dict[str, str]:
        """results.json and one PNG per figure into `out_dir`; {figure name: PNG path}."""
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.json").write_text(json.dumps(self.results(), indent=2) + "\n")
        paths = {}
        for name, picture in self.figures.items():
            paths[name] = str(out_dir / (name.replace(" ", "_") + ".png"))
            picture.save(paths[name])
        return paths

    def results(self) -> dict:
        """One key per metric: a number for a single cell, else {model: {value: number}}."""
        out: dict = {}
        for metric in self.settings.metrics:
            if len(self.cells) == 1:
                out[metric] = self.cells[0].scores[metric]
            else:
                out[metric] = {}
                for cell in self.cells:
                    out[metric].setdefault(cell.model, {})[cell.value] = cell.scores[metric]
        if "toy-geneval" in self.settings.metrics:
            out["toy-geneval per category"] = {f"{c.model} @ {c.value}": c.per_category for c in self.cells}
        out["samples per cell"] = len(self.cells[0].images) if self.cells else 0
        return out


def prompt_list(s: EvaluationSettings) -> list[tuple[str, str]]:
    """(category, prompt) pairs; the category is "" outside toy GenEval."""
    from .toyworld.geneval import prompt_set

    if s.prompt_set == "toy-geneval":
        return prompt_set(s.per_category)
    prompts = GENERAL_PROMPTS if s.prompt_set == "general" else s.prompts
    return [("", p) for p in prompts]


def metrics_folder(models: ModelManager) -> Path | None:
    """Where the studio looks for metric weights: metrics/ in its library (data/library/metrics)."""
    return models.user_dir / "metrics" if models.user_dir else None


def inception_weights(models: ModelManager) -> Path | None:
    """The converted FID Inception-V3 weights (`python -m studio convert-inception`), if there."""
    folder = metrics_folder(models)
    return folder / INCEPTION_WEIGHTS if folder and (folder / INCEPTION_WEIGHTS).is_file() else None


def check_metrics_available(s: EvaluationSettings, models: ModelManager) -> None:
    folder = metrics_folder(models)
    for metric in s.metrics:
        why = preference.missing(metric, folder) if metric in preference.METRICS else ""
        if why:
            raise ModelError(why)
    if "fid" in s.metrics and s.fid_features == "inception" and inception_weights(models) is None:
        raise ModelError(
            f"FID over Inception-V3 needs {folder / INCEPTION_WEIGHTS if folder else INCEPTION_WEIGHTS}: "
            "convert torch-fidelity's weights-inception-2015-12-05-6726825d.pth (pytorch-fid's "
            "pt_inception-2015-12-05-6726825d.pth) once with python -m studio convert-inception FILE"
        )
    if "fid" in s.metrics and s.reference is not None and not Path(s.reference).is_dir():
        raise SettingsError(f"the FID reference folder {s.reference} does not exist")


def check(s: EvaluationSettings, models: ModelManager, gallery=None) -> None:
    """Refuse, without loading anything, what `run` would refuse: missing metrics, unknown
    models, samplers a model can't take, a LoRA that is missing or for another family, a
    folder of pictures without PNGs, gallery ids with no picture."""
    from .schedulers import check_scheduler
    from .txt2img import model_defaults

    check_metrics_available(s, models)
    if s.images is not None:
        picture_files(s.images)
        return
    if s.gallery_ids:
        gallery_items(gallery, s.gallery_ids)
        return
    for model in s.models:
        spec = models.resolve(model)
        if spec.family == "unknown":
            continue  # a hub id: its family is known once it is loaded
        if s.axis == "lora":
            models._lora_source(s.lora.strip(), spec.family)  # missing, a base model, another family
        for name in s.values if s.axis == "scheduler" else [s.scheduler or model_defaults(spec)["scheduler"]]:
            check_scheduler(name, spec.family)


def image_count(s: EvaluationSettings) -> int:
    """How many images a run generates (or, scoring a folder, scores)."""
    if s.images is not None:
        return len(picture_files(s.images))
    if s.gallery_ids:
        return len(s.gallery_ids)
    return len(prompt_list(s)) * s.samples * len(s.models) * len(s.values)


def picture_files(folder: str) -> list[Path]:
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise SettingsError(f"the picture folder {folder} does not exist")
    files = sorted(path.glob("*.png"))
    if not files:
        raise SettingsError(f"{folder} has no PNG pictures")
    return files


def folder_pictures(folder: str) -> tuple[list, list[str]]:
    """A folder's PNGs and the prompt each one's metadata records ("" where none does)."""
    from .images import open_image
    from .pngmeta import read_png

    pictures, prompts = [], []
    for path in picture_files(folder):
        pictures.append(open_image(path))
        try:
            meta = read_png(path)
        except ValueError:
            meta = None
        prompt = (meta.settings or {}).get("prompt") if meta and meta.settings else None
        if not prompt and meta and meta.infotext:
            prompt = meta.infotext.split("\n")[0]
        prompts.append(prompt or "")
    return pictures, prompts


def gallery_items(gallery, ids: tuple[int, ...]) -> list:
    """The gallery items of `ids`, in order; ids with no item are named."""
    if gallery is None:
        raise SettingsError("gallery pictures are scored through the studio, which has the gallery")
    items = [gallery.get(i) for i in ids]
    lost = [str(i) for i, item in zip(ids, items, strict=True) if item is None]
    if lost:
        raise SettingsError(f"the gallery has no picture with id {', '.join(lost)}")
    return items


def gallery_pictures(gallery, ids: tuple[int, ...]) -> tuple[list, list[str]]:
    """Gallery pictures and the prompt each one's record holds."""
    from .images import open_image

    items = gallery_items(gallery, ids)
    return [open_image(item.image_path) for item in items], [item.prompt for item in items]


def generate(models: ModelManager, model: str, axis: str, value, jobs, s: EvaluationSettings, on_batch):
    """The images of `jobs` ((prompt, seed) pairs) on one cell's settings, in batches;
    `on_batch(n)` after each batch of n, and `on_batch(0)` after every step (to cancel)."""
    import torch

    from .schedulers import make_scheduler
    from .txt2img import model_defaults

    spec = models.resolve(model)
    d = model_defaults(spec)
    steps = value if axis == "steps" else s.steps or d["steps"]
    guidance = value if axis == "guidance" else (s.guidance if s.guidance is not None else d["guidance"])
    scheduler = value if axis == "scheduler" else s.scheduler or d["scheduler"]
    loras = (LoraRef(s.lora.strip(), value),) if axis == "lora" and value != 0 else ()
    images = []
    for start in range(0, len(jobs), BATCH):
        chunk = jobs[start : start + BATCH]
        with models.lend(model, loras=loras) as pipe:
            pipe.scheduler = make_scheduler(scheduler, spec.family, pipe.scheduler.config)
            size = {"width": d["width"], "height": d["height"]} if d["width"] else {}
            images += pipe(
                [p for p, _ in chunk],
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=[torch.Generator("cpu").manual_seed(seed) for _, seed in chunk],
                callback_on_step_end=lambda _pipe, _i, _t, kw: on_batch(0) or kw,
                **size,
            ).images
        on_batch(len(chunk))
    return images


def reference_images(s: EvaluationSettings, n: int = REFERENCE_RENDERS) -> tuple[list, str]:
    """The FID reference: the folder's pictures, or fresh toy-world renders."""
    import random

    from .images import open_image

    if s.reference:
        files = sorted(
            p for p in Path(s.reference).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")
        )
        if len(files) < 2:
            raise SettingsError(f"the FID reference folder {s.reference} has fewer than two pictures")
        return [open_image(p) for p in files], f"{len(files)} pictures in {s.reference}"
    from .toyworld.captions import sample_pair
    from .toyworld.render import render

    rng = random.Random(31337)
    return [render(sample_pair(rng)[1]) for _ in range(n)], f"{n} toy-world renders"


_REFERENCE_CACHE: dict = {}


def reference_features(s: EvaluationSettings, embedder):
    """The reference set's features, computed once a process per feature extractor (its weights)
    and reference (a folder counts as changed when any file's name, size or time changes)."""
    files = ()
    if s.reference and Path(s.reference).is_dir():
        files = tuple(
            (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(Path(s.reference).iterdir())
        )
    key = (embedder.key, s.reference, files)
    if key not in _REFERENCE_CACHE:
        pictures, described = reference_images(s)
        _REFERENCE_CACHE[key] = (embedder.image_features(pictures), described)
    return _REFERENCE_CACHE[key]


class Scorers:
    """The models of a run's metrics, loaded once: the CLIP model (CLIP-Score, and FID when it
    isn't over Inception), FID's feature extractor, the preference scorers."""

    def __init__(self, s: EvaluationSettings, models: ModelManager):
        from .inception import InceptionEmbedder
        from .metrics import ClipEmbedder

        self.metrics = s.metrics
        weights = inception_weights(models)
        inception = "fid" in s.metrics and s.fid_features != "clip" and weights is not None
        wants_clip = "clip-score" in s.metrics or ("fid" in s.metrics and not inception)
        self.clip = ClipEmbedder(s.clip_model, models.device) if wants_clip else None
        self.fid = InceptionEmbedder(weights, models.device) if inception else self.clip
        folder = metrics_folder(models)
        self.preference = {
            m: preference.load(m, folder, models.device) for m in s.metrics if m in preference.METRICS
        }

    def fid_note(self, described: str) -> str:
        if self.fid is self.clip:
            return f"FID over {self.clip.space}, against {described}; not Inception-V3's FID"
        return f"FID over {INCEPTION_SPACE}, against {described}"

    def score(self, images: list, prompts: list[str], reference) -> tuple[dict, str]:
        """Every metric but toy GenEval for pictures and their prompts; and FID's warning."""
        from .metrics import clip_score, fid

        scores, warning = {}, ""
        clip_features = self.clip.image_features(images) if self.clip is not None else None
        if "clip-score" in self.metrics:
            scores["clip-score"] = round(clip_score(clip_features, self.clip.text_features(prompts)), 4)
        if "fid" in self.metrics:
            features = clip_features if self.fid is self.clip else self.fid.image_features(images)
            result = fid(features, reference, self.fid.space)
            scores["fid"], warning = round(result.value, 4), result.warning
        for metric, scorer in self.preference.items():
            scores[metric] = round(float(np.mean(scorer.scores(images, prompts))), 4)
        return scores, warning


def run(
    settings: EvaluationSettings,
    models: ModelManager,
    *,
    on_progress: Callable[[int, int], None] | None = None,
    gallery=None,
) -> EvaluationReport:
    """Generate every cell, then score it; `on_progress(done, total)` (images generated, after
    each batch and, with `done` unchanged, after every denoising step) may raise Cancelled.
    With `settings.images` or `settings.gallery_ids` (items of `gallery`), score those
    pictures instead."""
    from .toyworld.judge import satisfies

    # 1. Refuse what can't run before generating anything.
    s = settings
    check(s, models, gallery)
    if s.scores_pictures:
        if s.images is not None:
            pictures, prompts = folder_pictures(s.images)
        else:
            pictures, prompts = gallery_pictures(gallery, s.gallery_ids)
        if on_progress is not None:
            on_progress(0, len(pictures))
        report = score_pictures(s, pictures, prompts, models)
        if on_progress is not None:
            on_progress(len(pictures), len(pictures))
        return report
    pairs = prompt_list(s)
    jobs = [(p, s.seed + k) for _, p in pairs for k in range(s.samples)]
    prompts = [p for p, _ in jobs]
    categories = [c for c, _ in pairs for _ in range(s.samples)]
    grid = [(m, v) for m in s.models for v in s.values]
    total, done = len(jobs) * len(grid), 0
    started = time.perf_counter()
    notes = []

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if on_progress is not None:
            on_progress(done, total)

    # 2. The metrics' models and the FID reference features, once.
    scorers = Scorers(s, models)
    reference = None
    if "fid" in s.metrics:
        reference, described = reference_features(s, scorers.fid)
        notes.append(scorers.fid_note(described))

    # 3. Each cell: generate, then score.
    cells = []
    for model, text in grid:
        cell_started = time.perf_counter()
        images = generate(models, model, s.axis, axis_value(s.axis, text), jobs, s, advance)
        cell = Cell(model, text, images=images)
        if "toy-geneval" in s.metrics:
            from .toyworld.geneval import CATEGORIES, HELD_OUT

            oks = [satisfies(image, p) for image, p in zip(images, prompts, strict=True)]
            for category in CATEGORIES + (HELD_OUT,):
                hits = [ok for ok, c in zip(oks, categories, strict=True) if c == category]
                cell.per_category[category] = round(sum(hits) / len(hits), 4)
            cell.scores["toy-geneval"] = round(
                sum(cell.per_category[c] for c in CATEGORIES) / len(CATEGORIES), 4
            )
        scores, warning = scorers.score(images, prompts, reference)
        cell.scores.update(scores)
        if warning and warning not in notes:
            notes.append(warning)
        cell.seconds = round(time.perf_counter() - cell_started, 1)
        cells.append(cell)
    report = EvaluationReport(s, cells, notes, round(time.perf_counter() - started, 1))
    report.figures = figures(report)
    return report


def score_pictures(
    s: EvaluationSettings, pictures: list, prompts: list[str], models: ModelManager
) -> EvaluationReport:
    """Score existing pictures (no generation): one cell named "pictures"; toy-geneval is then
    the share the judge finds satisfying their own prompts."""
    from .toyworld.judge import satisfies

    check_metrics_available(s, models)
    started = time.perf_counter()
    cell, notes = Cell("pictures", "-", images=pictures), []
    if {"toy-geneval", "clip-score", *preference.METRICS} & set(s.metrics):
        missing = [i for i, p in enumerate(prompts) if not p]
        if missing:
            raise SettingsError(
                f"{len(missing)} pictures carry no prompt (PNG metadata); scoring them needs one"
            )
    if "toy-geneval" in s.metrics:
        cell.scores["toy-geneval"] = round(
            sum(satisfies(im, p) for im, p in zip(pictures, prompts, strict=True)) / len(pictures), 4
        )
        notes.append("toy-geneval on given pictures: the share the judge finds satisfying their own prompts")
    scorers = Scorers(s, models)
    reference = None
    if "fid" in s.metrics:
        reference, described = reference_features(s, scorers.fid)
        notes.append(scorers.fid_note(described))
    scores, warning = scorers.score(pictures, prompts, reference)
    cell.scores.update(scores)
    notes += [warning] if warning else []
    report = EvaluationReport(
        s.replace(models=("pictures",), values=("-",), lora=""),
        [cell],
        notes,
        round(time.perf_counter() - started, 1),
    )
    from .charts import image_grid

    report.figures = {"grid": image_grid(report.cells, ("pictures",), ("-",))}  # no axis to plot against
    return report


def figures(report: EvaluationReport) -> dict:
    """An X/Y image grid (models down, axis values across, the first prompts' images), a line
    chart per metric against the axis, and toy GenEval's per-category bars."""
    from .charts import bar_chart, image_grid, line_chart

    s = report.settings
    out = {"grid": image_grid(report.cells, s.models, s.values)}
    numeric = s.axis != "scheduler"
    for metric in s.metrics:
        series = {
            model: [
                (float(c.value) if numeric else i, c.scores[metric])
                for i, c in enumerate(report.cells)
                if c.model == model
            ]
            for model in s.models
        }
        out[f"{metric} against {s.axis}"] = line_chart(series, s.axis, metric)
    if "toy-geneval" in s.metrics:
        out["toy GenEval per category"] = bar_chart(
            {f"{c.model} @ {c.value}": c.per_category for c in report.cells},
            "share of samples the judge accepts",
        )
    return out


def results_table(settings: dict, results: dict) -> tuple[list[str], list[list]]:
    """A stored run as a table: one row per cell (model, axis value), a column per metric,
    then toy GenEval's categories."""
    metrics = [m for m in settings["metrics"] if m in results]
    per_category = results.get("toy-geneval per category", {})
    categories = list(next(iter(per_category.values()), {}))
    rows = []
    for model in settings["models"]:
        for value in settings["values"]:
            row = [model, value]
            for metric in metrics:
                score = results[metric]
                row.append(score.get(model, {}).get(value) if isinstance(score, dict) else score)
            row += [per_category.get(f"{model} @ {value}", {}).get(c) for c in categories]
            rows.append(row)
    return ["model", settings["axis"], *metrics, *categories], rows
