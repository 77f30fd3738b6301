"""Training pictures: a folder (or uploads) read as hostile input, captioned, sized to the model.

Each picture is resized so its shorter side is the training resolution, then cropped to a
square: in the centre, or at a random place each time it is drawn. Captions come from a
`.txt` file of the same name, else the instance prompt. Pictures that can't be read are
skipped and listed, never fatal unless none is left.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..images import ImageInputError, open_image
from ..settings import SettingsError
from .settings import PICTURE_SUFFIXES

MAX_PICTURES = 10_000
MAX_CAPTION_CHARS = 1000


@dataclass(frozen=True)
class TrainingPictures:
    pictures: tuple[Image.Image, ...]  # shorter side = resolution
    captions: tuple[str, ...]
    names: tuple[str, ...]
    skipped: tuple[str, ...]  # "name: why"
    resolution: int
    crop: str

    def describe(self) -> str:
        text = (
            f"{len(self.pictures)} pictures, shorter side resized to {self.resolution} px, "
            f"{self.crop}-cropped to {self.resolution}×{self.resolution}"
        )
        if self.skipped:
            text += f"; skipped {len(self.skipped)}: " + "; ".join(self.skipped)
        return text


def load_pictures(folder: str | Path, instance_prompt: str, resolution: int, crop: str) -> TrainingPictures:
    """The pictures in `folder` (not its subfolders), in name order."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise SettingsError(f"training images: {folder} is not a folder")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in PICTURE_SUFFIXES)
    if len(files) > MAX_PICTURES:
        raise SettingsError(f"training images: {len(files)} pictures; the limit is {MAX_PICTURES}")
    pictures, captions, names, skipped = [], [], [], []
    for path in files:
        try:
            picture = open_image(path)
        except ImageInputError as exc:
            skipped.append(f"{path.name}: {exc}")
            continue
        pictures.append(_shorter_side(picture, resolution))
        captions.append(_caption(path, instance_prompt))
        names.append(path.name)
    if not pictures:
        why = f" (skipped: {'; '.join(skipped)})" if skipped else ""
        raise SettingsError(f"training images: no readable picture in {root}{why}")
    return TrainingPictures(tuple(pictures), tuple(captions), tuple(names), tuple(skipped), resolution, crop)


def to_tensor(
    picture: Image.Image, resolution: int, crop: str, flipped: bool, generator: torch.Generator
) -> torch.Tensor:
    """One square training view in [-1, 1], (3, res, res), mirrored where `flipped`."""
    w, h = picture.size
    if crop == "random":
        left = int(torch.randint(0, w - resolution + 1, (1,), generator=generator))
        top = int(torch.randint(0, h - resolution + 1, (1,), generator=generator))
    else:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    view = picture.crop((left, top, left + resolution, top + resolution))
    if flipped:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(view, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def _shorter_side(picture: Image.Image, resolution: int) -> Image.Image:
    w, h = picture.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    return picture if size == (w, h) else picture.resize(size, Image.Resampling.LANCZOS)


def _caption(path: Path, instance_prompt: str) -> str:
    text_file = path.with_suffix(".txt")
    if not text_file.is_file():
        return instance_prompt
    text = text_file.read_text(encoding="utf-8", errors="replace").strip()[:MAX_CAPTION_CHARS]
    return text or instance_prompt
