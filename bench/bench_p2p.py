"""Prompt-to-Prompt on the toy world: word swaps kept, against plain regeneration; reweighting.

    python bench/bench_p2p.py [--model toy-sd] [--swaps 100] [--case-seed 9100] [--seeds 8]
                              [--blend-thresholds 0.3 0.5] [--plot bench/p2p_reweight.png]

Prints JSON: the share of shape and colour swaps ("a red circle on the left" → "a red square
on the left") where the judge reads the new word and the source's other attribute,
background and centre (≤ 4 px), for P2P and for txt2img of the edited prompt with the same
seed, side by side on the same cases, at the model's default replace fractions (toy-sd's
self-attention share was chosen on the cases of `p2p_eval.EVAL_SEED`; the default --case-seed
draws other ones), then again with local blending on the object's words at each threshold
(0.3 is the paper's; 0.5 was chosen on the cases of `p2p_eval.EVAL_SEED`); and the pixel
share of a colour against its word's reweighting factor (mean and standard error over seeds,
its rise from the previous factor seed by seed, and the shapes the judge reads), drawn as a PNG,
and whether each sweep is non-decreasing (`p2p_eval.is_non_decreasing`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FACTORS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
REWEIGHT_PROMPTS = {
    "a red circle on a white background": "red",
    "a red shape and a blue shape on a white background": "red",
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="toy-sd")
    parser.add_argument("--swaps", type=int, default=100)
    parser.add_argument("--case-seed", type=int, default=9100, help="draws the swap cases")
    parser.add_argument("--seeds", type=int, default=16, help="seeds per reweighting factor")
    parser.add_argument("--blend-thresholds", type=float, nargs="*", default=[0.3, 0.5])
    parser.add_argument("--plot", type=Path, default=Path("bench/p2p_reweight.png"))
    args = parser.parse_args()

    from studio.charts import line_chart
    from studio.models import ModelManager
    from studio.toyworld.p2p_eval import is_non_decreasing, reweight_sweep, word_swap

    manager = ModelManager()
    started = time.perf_counter()
    report = {"word_swap": word_swap(manager, args.model, n=args.swaps, seed=args.case_seed), "reweight": {}}
    for threshold in args.blend_thresholds:
        report[f"word_swap local blend {threshold:g}"] = word_swap(
            manager,
            args.model,
            n=args.swaps,
            seed=args.case_seed,
            local_blend=True,
            regenerate=False,  # the same cases' regeneration is in "word_swap"
            blend_threshold=threshold,
        )
    for prompt, word in REWEIGHT_PROMPTS.items():
        report["reweight"][f"{prompt} | {word}"] = reweight_sweep(
            manager, args.model, prompt, word, FACTORS, seeds=range(args.seeds)
        )
    report["reweight non-decreasing"] = {
        key: is_non_decreasing(sweep) for key, sweep in report["reweight"].items()
    }
    report["seconds"] = round(time.perf_counter() - started, 1)
    line_chart(
        {
            key.split(" on a")[0]: [(factor, row["share"]) for factor, row in sweep.items()]
            for key, sweep in report["reweight"].items()
        },
        "reweight factor of 'red'",
        "red pixel share",
    ).save(args.plot)
    print(json.dumps(report, indent=1))
    print(f"reweight plot: {args.plot}")


if __name__ == "__main__":
    main()
