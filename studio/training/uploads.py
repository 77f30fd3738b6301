"""Uploaded training pictures (and their .txt captions) copied into a folder of their own.

Names come from the browser and are hostile: only the final component is kept, reduced to
safe characters and prefixed with its position, so nothing escapes the folder or clashes.
"""

from __future__ import annotations

import re
import shutil
import uuid
from pathlib import Path

from ..settings import SettingsError
from .settings import PICTURE_SUFFIXES

MAX_UPLOADS = 1000
UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def collect_uploads(files: list[str | Path], root: Path) -> Path:
    """A new folder under `root` holding the uploaded pictures and captions; its path."""
    if not files:
        raise SettingsError("no training images: give a folder or upload pictures")
    if len(files) > MAX_UPLOADS:
        raise SettingsError(f"{len(files)} files uploaded; the limit is {MAX_UPLOADS}")
    folder = root / f"train-{uuid.uuid4().hex[:12]}"
    folder.mkdir(parents=True)
    stems: dict[str, str] = {}
    for i, file in enumerate(files):
        source = Path(file)
        suffix = source.suffix.lower()
        if suffix not in (*PICTURE_SUFFIXES, ".txt"):
            continue
        stem = UNSAFE.sub("_", source.stem)[:60] or "file"
        # a caption keeps its picture's new name, whatever order they came in
        name = stems.setdefault(stem, f"{i:04d}-{stem}")
        shutil.copyfile(source, folder / f"{name}{suffix}")
    return folder
