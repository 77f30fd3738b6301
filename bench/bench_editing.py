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

    from studio.charts import line_chart
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
    line_chart(
        {key: [(r["strength"], r[key]) for r in sweep] for key in ("kept_layout", "follows_prompt")},
        "strength",
        "share of cases",
    ).save(args.plot)
    print(json.dumps(report, indent=1))
    print(f"sweep plot: {args.plot}")


if __name__ == "__main__":
    main()
