"""Editing on the toy world: toy InstructPix2Pix on held-out edits, SDEdit recolour, strength sweep.

    python bench/bench_editing.py [--edits 100] [--recolours 100] [--sweep 40] [--plot sweep.png]

Prints JSON: the InstructPix2Pix score (overall and per edit kind, the judge reading
both pictures), SDEdit recolour at strength 0.6 (new colour and centre moved ≤ 4 px),
and the strength sweep 0 → 1 of "kept layout" against "follows prompt", drawn as a PNG.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def draw_sweep(rows: list[dict], path: Path) -> None:
    """A small line chart of the sweep (PIL only): strength on x, share on y."""
    from PIL import Image, ImageDraw

    w, h, pad = 480, 300, 40
    image = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(image)
    d.rectangle((pad, pad // 2, w - pad // 2, h - pad), outline="black")
    for i in range(0, 11, 2):
        x = pad + (w - 1.5 * pad) * i / 10
        d.text((x - 6, h - pad + 4), f"{i / 10:.1f}", fill="black")
        y = h - pad - (h - 1.5 * pad) * i / 10
        d.text((4, y - 6), f"{i / 10:.1f}", fill="black")
    for key, color in (("kept_layout", (40, 90, 220)), ("follows_prompt", (220, 40, 40))):
        points = [(pad + (w - 1.5 * pad) * r["strength"], h - pad - (h - 1.5 * pad) * r[key]) for r in rows]
        d.line(points, fill=color, width=2)
        d.text((points[-1][0] - 90, points[-1][1] + (6 if key == "kept_layout" else -14)), key, fill=color)
    d.text((w // 2 - 30, h - 14), "strength", fill="black")
    image.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ip2p-model", default="toy-instruct-pix2pix")
    parser.add_argument("--sd-model", default="toy-sd")
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument("--recolours", type=int, default=100)
    parser.add_argument("--sweep", type=int, default=40, help="cases per strength of the sweep")
    parser.add_argument("--plot", type=Path, default=Path("bench/sdedit_strength_sweep.png"))
    args = parser.parse_args()

    from studio.models import ModelManager
    from studio.toyworld.edit_eval import instruct_pix2pix_score, sdedit_recolour, strength_sweep

    manager = ModelManager()
    report = {}
    started = time.perf_counter()
    report["instruct_pix2pix"] = instruct_pix2pix_score(manager, args.ip2p_model, n=args.edits)
    report["sdedit_recolour_0.6"] = sdedit_recolour(manager, args.sd_model, 0.6, n=args.recolours)
    sweep = strength_sweep(manager, args.sd_model, n=args.sweep)
    report["strength_sweep"] = sweep
    report["seconds"] = round(time.perf_counter() - started, 1)
    draw_sweep(sweep, args.plot)
    print(json.dumps(report, indent=1))
    print(f"sweep plot: {args.plot}")


if __name__ == "__main__":
    main()
