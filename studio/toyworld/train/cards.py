"""Model cards: a README.md in each toy model folder saying how it was made and how it scores."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return f"1 × {torch.cuda.get_device_name(0)}"
    return f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}"


def write_card(folder: Path, title: str, summary: str, facts: dict, scores: dict) -> None:
    lines = [f"# {title}", "", summary, "", "## Training", ""]
    lines += [f"- {k}: {v}" for k, v in facts.items()]
    lines += ["", "## Scores", "", "```json", json.dumps(scores, indent=2, ensure_ascii=False), "```", ""]
    lines += [
        "Made by `python -m studio.toyworld.train` on the world of `shared/toyworld.md`; "
        "loads with the standard diffusers / transformers `from_pretrained`.",
        "",
    ]
    (folder / "README.md").write_text("\n".join(lines))
