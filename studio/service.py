"""The studio's services in one object: a model manager, a gallery, and where data lives.

Tabs, the API and the CLI all go through `Studio`: it runs a technique on the shared
lane, and stores every finished image in the gallery with the settings that remake it.
Nothing is opened or probed until first used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from . import controlnet, evaluate, instantid, ip2p, ip_adapter, p2p, sdedit, txt2img
from .gallery import Gallery, GalleryError, GalleryItem
from .images import open_image
from .jobs import JobContext, JobRunner
from .models import ModelManager
from .pngmeta import format_infotext
from .settings import SettingsError
from .training.settings import TrainingSettings

DEFAULT_DATA_DIR = Path("data")


@dataclass(frozen=True)
class Paths:
    db: Path
    images: Path
    jobs: Path | None = None  # jobs' output folders; None: "jobs" beside the database

    @classmethod
    def from_env(
        cls, data_dir: str | os.PathLike | None = None, db: str | None = None, images: str | None = None
    ):
        root = Path(data_dir or os.environ.get("LATENT_STUDIO_DATA") or DEFAULT_DATA_DIR)
        return cls(
            db=Path(db or os.environ.get("LATENT_STUDIO_DB") or root / "gallery.db"),
            images=Path(images or os.environ.get("LATENT_STUDIO_IMAGES") or root / "images"),
            jobs=root / "jobs",
        )


def infotext(settings, family: str = "", prompt: str | None = None) -> str:
    """AUTOMATIC1111's `parameters` text for one image's settings (`prompt`: the image's own
    prompt where it isn't `settings.prompt`, as for Prompt-to-Prompt's edited image)."""
    params = {
        "Steps": settings.steps,
        "Sampler": settings.scheduler,
        "CFG scale": settings.guidance,
        "Seed": settings.seed,
        "Size": f"{settings.width}x{settings.height}",
        "Model": settings.model,
    }
    if getattr(settings, "strength", None) is not None:
        params["Denoising strength"] = settings.strength
    if getattr(settings, "image_guidance", None) is not None:
        params["Image CFG scale"] = settings.image_guidance
    if settings.technique == "p2p":
        params["Prompt-to-Prompt"] = (
            f"{settings.mode} from {settings.prompt!r}; cross {settings.cross_replace:g}, "
            f"self {settings.self_replace:g}"
        )
    if getattr(settings, "loras", ()):
        params["Lora weights"] = ", ".join(f"{lr.source}: {lr.weight}" for lr in settings.loras)
    if family:
        params["Family"] = family
    params["Version"] = "latent-studio"
    return format_infotext(prompt or settings.prompt, settings.negative_prompt, params)


class Studio:
    def __init__(
        self, paths: Paths | None = None, models: ModelManager | None = None, default_model: str = "toy-sd"
    ):
        self.paths = paths or Paths.from_env()
        self.models = models or ModelManager()
        self.default_model = default_model
        self._gallery: Gallery | None = None
        self._jobs: JobRunner | None = None
        if self.models.user_dir is None:  # where trained LoRAs, embeddings and models go
            self.models.user_dir = self.paths.db.parent / "library"

    @property
    def gallery(self) -> Gallery:
        if self._gallery is None:
            self.paths.db.parent.mkdir(parents=True, exist_ok=True)
            self.paths.images.mkdir(parents=True, exist_ok=True)
            self._gallery = Gallery(self.paths.db, self.paths.images).open()
        return self._gallery

    @property
    def jobs(self) -> JobRunner:
        """The runner of long work (evaluations, training), made on first use."""
        if self._jobs is None:
            self._jobs = JobRunner(
                lambda: self.gallery, self.models.lane, self.paths.jobs or self.paths.db.parent / "jobs"
            )
        return self._jobs

    def txt2img(self, settings: txt2img.Txt2ImgSettings, *, on_step=None, store: bool = True):
        """Generate, then store every image; a cancelled run raises and stores nothing."""
        result = txt2img.run(settings, self.models, on_step=on_step)
        items = self.store(result) if store else []
        return result, items

    def sdedit(self, settings: sdedit.SDEditSettings, image=None, *, on_step=None, store: bool = True):
        """SDEdit `image` (or the gallery item `settings.source_id`); results are its children."""
        return self._edit(sdedit.run, settings, image, on_step=on_step, store=store)

    def ip2p(self, settings: ip2p.InstructPix2PixSettings, image=None, *, on_step=None, store: bool = True):
        """InstructPix2Pix on `image` (or the gallery item `settings.source_id`)."""
        return self._edit(ip2p.run, settings, image, on_step=on_step, store=store)

    def p2p(self, settings: p2p.PromptToPromptSettings, *, on_step=None, store: bool = True):
        """Prompt-to-Prompt: the source and the edited image (its child) from one run."""
        result = p2p.run(settings, self.models, on_step=on_step)
        if not store:
            return result, []
        s, per_image = result.settings, result.duration_s / 2
        source = self._add(result.images[0], s, result.family, per_image, prompt=s.prompt)
        edited = self._add(
            result.images[1], s, result.family, per_image, prompt=s.edited_prompt, parent_id=source.id
        )
        return result, [source, edited]

    def controlnet(
        self, settings: controlnet.ControlNetSettings, inputs=None, *, on_step=None, store: bool = True
    ):
        """Generate following each unit's map. `inputs[i]` is unit i's picture (a path, bytes, a
        file or PIL; None: the stored map `units[i].map_id`). Maps not yet in the gallery are
        stored (technique "control map") and become the results' parents; the settings
        recorded with each result name them, so that restoring remakes the image."""
        # 1. Each unit's picture: the upload, or its stored map (an identical upload keeps the id).
        # Fewer pictures than units: they go, in order, to the units without a stored map.
        inputs = list(inputs or [])
        open_units = [i for i, u in enumerate(settings.units) if u.map_id is None]
        if len(inputs) != len(settings.units):
            if len(inputs) != len(open_units):
                raise SettingsError(
                    f"{len(settings.units)} control units, {len(open_units)} without a stored map, "
                    f"but {len(inputs)} pictures"
                )
            given = dict(zip(open_units, inputs, strict=True))
            inputs = [given.get(i) for i in range(len(settings.units))]
        pictures, units = [], []
        for unit, given in zip(settings.units, inputs, strict=True):
            stored = self._source_item(unit.map_id) if unit.map_id is not None else None
            if given is None and stored is None:
                raise SettingsError("a control unit has no image: upload one or pick a stored map")
            picture = open_image(given if given is not None else stored.image_path)
            if stored is not None and given is not None and not _same_pixels(picture, stored.image_path):
                unit = dataclasses.replace(unit, map_id=None)  # a new picture, not the stored map
            pictures.append(picture)
            units.append(unit)
        # 2. Run first: a refused or cancelled run stores nothing.
        result = controlnet.run(settings.replace(units=tuple(units)), pictures, self.models, on_step=on_step)
        if not store:
            return result, []
        # 3. Store the new maps, then the images as the first map's children.
        for i, unit in enumerate(units):
            if unit.map_id is None:
                item = self.gallery.add(
                    result.figures[f"control map {i + 1}"],
                    technique="control map",
                    model=unit.model,
                    prompt=f"{unit.preprocessor} map" if unit.preprocessor != "none" else "control map",
                    settings={},
                )
                units[i] = dataclasses.replace(unit, map_id=item.id)
        result.settings = result.settings.replace(units=tuple(units))
        return result, self.store(result, parent_id=units[0].map_id)

    def ip_adapter(
        self,
        settings: ip_adapter.IPAdapterSettings,
        references=None,
        masks=None,
        *,
        on_step=None,
        store: bool = True,
    ):
        """Generate with image prompts. `references` are pictures (paths, bytes, files or PIL):
        one for every reference of every unit, or one for every reference of the units without
        stored ones (`reference_ids`), in order. `masks` likewise: one per masked unit, or one per
        masked unit without a stored `mask_id`. New references and masks are stored (techniques
        "reference" and "ip mask") and named in the recorded settings; the images are children
        of the first reference, so restoring the settings remakes them."""
        units = list(settings.units)
        # 1. The pictures of each unit: uploads, else its stored references (an identical upload keeps the ids).
        given = list(references or [])
        if len(given) == settings.reference_count:
            open_units = list(range(len(units)))
        else:
            open_units = [i for i, u in enumerate(units) if not u.reference_ids]
            wanted = sum(units[i].references for i in open_units)
            if len(given) != wanted:
                raise SettingsError(
                    f"the IP-Adapters read {settings.reference_count} reference picture(s), {wanted} of them "
                    f"without a stored picture, but {len(given)} were given"
                )
        pictures: list = []
        for i, unit in enumerate(units):
            if i in open_units:
                mine = [open_image(p) for p in given[: unit.references]]
                given = given[unit.references :]
                stored = [self._source_item(r) for r in unit.reference_ids]
                if not stored or not all(
                    _same_pixels(p, it.image_path) for p, it in zip(mine, stored, strict=True)
                ):
                    units[i] = dataclasses.replace(unit, reference_ids=())
            else:
                mine = [open_image(self._source_item(r).image_path) for r in unit.reference_ids]
            pictures += mine
        # 2. The masks: uploads for the masked units without a stored one (or for all masked units).
        given_masks = list(masks or [])
        masked = [i for i, u in enumerate(units) if u.masked]
        open_masks = (
            masked if len(given_masks) == len(masked) else [i for i in masked if units[i].mask_id is None]
        )
        if len(given_masks) != len(open_masks):
            raise SettingsError(
                f"{len(masked)} masked IP-Adapter(s), {len(open_masks)} without a stored mask, "
                f"but {len(given_masks)} mask picture(s)"
            )
        mask_pictures = [None] * len(units)
        for i in masked:
            if i in open_masks:
                mask_pictures[i] = open_image(given_masks.pop(0))
                if units[i].mask_id is not None and not _same_pixels(
                    mask_pictures[i], self._source_item(units[i].mask_id).image_path
                ):
                    units[i] = dataclasses.replace(units[i], mask_id=None)
            else:
                mask_pictures[i] = open_image(self._source_item(units[i].mask_id).image_path)
        # 3. Run first: a refused or cancelled run stores nothing.
        s = settings.replace(units=tuple(units))
        result = ip_adapter.run(s, pictures, self.models, masks=mask_pictures, on_step=on_step)
        if not store:
            return result, []
        # 4. Store the new references and masks, then the images as the first reference's children.
        flat = iter(pictures)
        for i, unit in enumerate(units):
            mine = [next(flat) for _ in range(unit.references)]
            if not unit.reference_ids:
                ids = tuple(
                    self.gallery.add(
                        p,
                        technique=ip_adapter.REFERENCE_TECHNIQUE,
                        model=unit.adapter,
                        prompt="reference",
                        settings={},
                    ).id
                    for p in mine
                )
                units[i] = unit = dataclasses.replace(unit, reference_ids=ids)
            if unit.masked and unit.mask_id is None:
                item = self.gallery.add(
                    mask_pictures[i],
                    technique=ip_adapter.MASK_TECHNIQUE,
                    model=unit.adapter,
                    prompt="mask",
                    settings={},
                )
                units[i] = dataclasses.replace(unit, mask_id=item.id)
        result.settings = result.settings.replace(units=tuple(units))
        return result, self.store(result, parent_id=units[0].reference_ids[0])

    def instantid(
        self,
        settings: instantid.InstantIDSettings,
        face=None,
        *,
        analyser=None,
        on_step=None,
        store: bool = True,
    ):
        """InstantID from a face picture (or the gallery item `settings.face_id`); the face is
        stored (technique "face") as the images' parent, its keypoint map is in `figures`."""
        stored = self._source_item(settings.face_id) if settings.face_id is not None else None
        if face is None and stored is None:
            raise SettingsError("no face picture: upload one, or send one from the gallery")
        picture = open_image(face if face is not None else stored.image_path)
        if stored is not None and face is not None and not _same_pixels(picture, stored.image_path):
            stored = None
        s = settings.replace(face_id=stored.id if stored else None)
        result = instantid.run(s, picture, self.models, analyser=analyser, on_step=on_step)
        if not store:
            return result, []
        if stored is None:
            stored = self.gallery.add(
                picture, technique=instantid.FACE_TECHNIQUE, model="", prompt="face", settings={}
            )
            result.settings = result.settings.replace(face_id=stored.id)
        return result, self.store(result, parent_id=stored.id)

    def evaluate(self, settings: evaluate.EvaluationSettings, *, on_progress=None, store: bool = True):
        """Generate and score; stores the figures (technique "evaluation") and the numbers
        (results.json's dict plus the run's "notes")."""
        report = evaluate.run(settings, self.models, on_progress=on_progress, gallery=self.gallery)
        if not store:
            return report, None
        settings = report.settings  # scoring pictures: its one cell is named "pictures"
        figure_ids = [
            self.gallery.add(
                picture, technique="evaluation", model=", ".join(settings.models), prompt=name, settings={}
            ).id
            for name, picture in report.figures.items()
        ]
        record = self.gallery.add_evaluation(
            settings.to_dict(), {**report.results(), "notes": list(report.notes)}, figure_ids, report.seconds
        )
        return report, record

    def start_evaluation(self, settings: evaluate.EvaluationSettings) -> int:
        """Run `evaluate` as a job (kind "evaluation"); its id. What can be refused without
        loading anything is refused here. The job stores the evaluation as `evaluate` does;
        its result is results.json's dict plus "figures" ({name: PNG path in its out_dir}),
        "notes", "evaluation_id" and "seconds"."""
        evaluate.check(settings, self.models, self.gallery)
        total = evaluate.image_count(settings)
        what = "pictures scored" if settings.scores_pictures else "images generated"

        def work(ctx: JobContext) -> dict:
            ctx.report(0, total, "loading the models and the metrics")

            def on_progress(done: int, _total: int) -> None:
                ctx.check_cancel()
                ctx.report(done, total, f"{done}/{total} {what}")

            report, record = self.evaluate(settings, on_progress=on_progress)
            ctx.report(total, total, "scored")
            return {
                **record.results,
                "figures": report.save(ctx.out_dir),
                "evaluation_id": record.id,
                "seconds": report.seconds,
            }

        return self.jobs.submit("evaluation", settings, work)

    def _edit(self, run, settings, image, *, on_step, store: bool):
        # 1. The input: an upload, or a gallery item; an upload is stored first (as the parent).
        source = self._source_item(settings.source_id) if settings.source_id is not None else None
        if image is None and source is None:
            raise SettingsError("no input image: upload one, or send one from the gallery")
        picture = open_image(image if image is not None else source.image_path)
        if source is not None and image is not None and not _same_pixels(picture, source.image_path):
            source = None  # a different picture than the item named: a new upload
        # 2. Run first, so that a refused or cancelled edit stores nothing at all.
        result = run(
            settings.replace(source_id=source.id if source else None), picture, self.models, on_step=on_step
        )
        unchanged = getattr(result.settings, "strength", None) == 0  # SDEdit at strength 0 made nothing
        if not store or unchanged:
            return result, []
        if source is None:
            source = self._store_upload(picture)
            result.settings = result.settings.replace(source_id=source.id)
        return result, self.store(result, parent_id=source.id)

    def _store_upload(self, picture) -> GalleryItem:
        """Store an uploaded input image (already read by `open_image`), as its edits' parent."""
        return self.gallery.add(picture, technique="upload", model="", prompt="", settings={})

    def _source_item(self, item_id: int) -> GalleryItem:
        item = self.gallery.get(item_id)
        if item is None:
            raise GalleryError(f"gallery image #{item_id} no longer exists")
        return item

    def store(self, result, parent_id: int | None = None) -> list[GalleryItem]:
        per_image = result.duration_s / max(1, len(result.images))
        return [
            self._add(image, result.image_settings(index), result.family, per_image, parent_id=parent_id)
            for index, image in enumerate(result.images)
        ]

    def _add(self, image, s, family: str, duration_s: float, *, prompt=None, parent_id=None) -> GalleryItem:
        """Store one image with the settings that remake it."""
        return self.gallery.add(
            image,
            technique=s.technique,
            model=s.model,
            prompt=prompt or s.prompt,
            negative_prompt=s.negative_prompt,
            seed=s.seed,
            steps=s.steps,
            guidance=s.guidance,
            width=image.width,
            height=image.height,
            scheduler=s.scheduler,
            settings=s.to_dict(),
            infotext=infotext(s, family, prompt),
            parent_id=parent_id,
            duration_s=duration_s,
        )

    @staticmethod
    def preview(latents, spec):
        """A quick RGB look at a step's latents (one linear map, no VAE), at the image's size.

        `spec` is the model's ModelSpec, resolved once per run rather than at every step."""
        from .preview import LATENT_RGB, latents_to_rgb

        factors = spec.defaults.get("latent_rgb") or LATENT_RGB.get(spec.family)
        if factors is None or latents is None or latents.dim() != 4 or latents.shape[1] != len(factors):
            return None
        image = latents_to_rgb(latents[:1], factors)[0]
        return image.resize((image.width * 8, image.height * 8))

    def start_training(self, settings: TrainingSettings, *, out_dir: Path | None = None) -> int:
        """Train as a job (kind "training"); its id. Given the folder of an earlier run, the
        job continues from that run's newest checkpoint. Its result names the output (a LoRA,
        an embedding or a model folder), which the catalog lists at once."""
        self.models.resolve(settings.model)
        if not Path(settings.images).expanduser().is_dir():
            raise SettingsError(f"training images: {settings.images} is not a folder")

        def work(ctx: JobContext) -> dict:
            from .training import trainer

            return trainer.run(settings, self.models, ctx)

        return self.jobs.submit("training", settings, work, out_dir=out_dir)

    def collect_training_uploads(self, files: list) -> Path:
        """Uploaded pictures (and captions) copied into a folder of their own, to train on."""
        from .training.uploads import collect_uploads

        return collect_uploads(files, self.paths.db.parent / "uploads")

    def training_samples(self, state) -> list:
        """A training job's sample rows as (picture, "step N"), newest first."""
        from PIL import Image

        shown = []
        for path in reversed(state.samples):
            with contextlib.suppress(OSError):
                shown.append((Image.open(path).convert("RGB"), f"step {int(Path(path).stem.split('-')[-1])}"))
        return shown

    def resume_training(self, job_id: int) -> int:
        """A new job that continues the stopped training job `job_id` in its folder."""
        state = self.jobs.get(job_id)
        if state.kind != "training":
            raise SettingsError(f"job #{job_id} is an {state.kind} job, not a training run")
        if state.status not in ("cancelled", "interrupted", "failed"):
            raise SettingsError(f"job #{job_id} is {state.status}; only a stopped run can be resumed")
        return self.start_training(TrainingSettings.from_dict(state.settings), out_dir=Path(state.out_dir))

    def close(self) -> None:
        if self._jobs is not None:
            self._jobs.close()
            self._jobs = None
        if self._gallery is not None:
            self._gallery.close()
            self._gallery = None


def _same_pixels(picture, path: str) -> bool:
    from PIL import ImageChops

    stored = open_image(path)
    return stored.size == picture.size and ImageChops.difference(stored, picture).getbbox() is None
