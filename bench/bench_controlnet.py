"""Toy ControlNets on held-out scenes: structure kept against plain txt2img, and a scale sweep.

    python bench/bench_controlnet.py [--scenes 100] [--sweep 40] [--plot bench/controlnet_scale_sweep.png]

Prints JSON: for the Canny and the segmentation ControlNet, the share of held-out scenes
whose generated shapes overlap the scene's with IoU ≥ 0.7 and are read by the judge as the
same shapes, beside txt2img of the same captions and seeds; and the Canny ControlNet's
conditioning-scale sweep 0 → 1.5 (structure-following against prompt-following), drawn.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SCALES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
CONTROLNETS = {"canny": "toy-sd-controlnet-canny", "seg": "toy-sd-controlnet-seg"}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="toy-sd")
    parser.add_argument("--scenes", type=int, default=100)
    parser.add_argument("--sweep", type=int, default=40, help="scenes per scale of the sweep")
    parser.add_argument("--plot", type=Path, default=Path("bench/controlnet_scale_sweep.png"))
    args = parser.parse_args()

    from studio.charts import line_chart
    from studio.models import ModelManager
    from studio.toyworld.control_eval import controlnet_score, scale_sweep

    manager = ModelManager()
    started = time.perf_counter()
    report = {
        kind: controlnet_score(manager, args.model, name, kind, n=args.scenes)
        for kind, name in CONTROLNETS.items()
    }
    sweep = scale_sweep(manager, args.model, CONTROLNETS["canny"], "canny", SCALES, n=args.sweep)
    report["canny_scale_sweep"] = sweep
    report["seconds"] = round(time.perf_counter() - started, 1)
    line_chart(
        {
            "structure (IoU ≥ 0.7)": [(r["scale"], r["structure"]) for r in sweep],
            "prompt (judge)": [(r["scale"], r["prompt"]) for r in sweep],
        },
        "conditioning scale",
        "share of scenes",
    ).save(args.plot)
    print(json.dumps(report, indent=1))
    print(f"sweep plot: {args.plot}")


if __name__ == "__main__":
    main()
