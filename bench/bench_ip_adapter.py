"""The toy IP-Adapter on held-out references, its scale sweep, and the paper's ablation.

    python bench/bench_ip_adapter.py [--cases 120] [--sweep 120] [--plot bench/ip_adapter_scale_sweep.png]
        [--ablation runs/toyworld/toy-ip-adapter-concat]

Prints JSON:
- the issue's bar: a held-out reference of one shape + "a shape POSITION"; the share of cases
  where the judge reads exactly one shape of the reference's shape and colour, the share
  where that shape is at the prompted position, and both (the position rate is reported
  apart, with toy-sd's own rate at λ = 0);
- λ swept 0 (the prompt alone, bit-identical to toy-sd) → 1.5, drawn;
- the ablation (Ye et al.'s "simple adapter"): the same training with the image tokens
  concatenated to the text tokens in one softmax (`python -m studio.toyworld.train ip_adapter
  --ablation`), against the decoupled adapter: reference-following (the bar's rates at λ = 1)
  and prompt-following (toy GenEval, each prompt with an agreeing reference), beside toy-sd.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SCALES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="toy-sd")
    parser.add_argument("--adapter", default="toy-ip-adapter")
    parser.add_argument("--cases", type=int, default=120)
    parser.add_argument("--sweep", type=int, default=120, help="cases per scale of the sweep")
    parser.add_argument("--ablation", type=Path, default=Path("runs/toyworld/toy-ip-adapter-concat"))
    parser.add_argument("--per-category", type=int, default=12, help="toy GenEval prompts per category")
    parser.add_argument("--plot", type=Path, default=Path("bench/ip_adapter_scale_sweep.png"))
    args = parser.parse_args()

    from studio.charts import line_chart
    from studio.models import ModelManager
    from studio.toyworld.evaluate import geneval_for
    from studio.toyworld.ip_adapter_eval import geneval_with_references, reference_score, scale_sweep

    manager = ModelManager()
    started = time.perf_counter()
    sweep = scale_sweep(manager, args.model, args.adapter, SCALES, n=args.sweep)
    bar = (
        sweep[1.0]
        if args.cases == args.sweep
        else reference_score(manager, args.model, args.adapter, args.cases)
    )
    series = {
        name: [(s, r[key]) for s, r in sweep.items()]
        for name, key in (("shape+colour", "shape_colour"), ("position", "position"), ("joint", "joint"))
    }
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    line_chart(series, "IP-Adapter scale λ", "share of held-out cases").save(args.plot)
    report = {
        "bar (λ = 1)": bar,
        "scale sweep": {f"{s:g}": r for s, r in sweep.items()},
        "plot": str(args.plot),
    }
    if (args.ablation / "ip-adapter_toy-sd.safetensors").exists():
        concat = str(args.ablation)
        report["ablation"] = {
            "decoupled (eq. 5)": {
                "reference-following": bar,
                "prompt-following (toy GenEval with references)": geneval_with_references(
                    manager, args.model, args.adapter, per_category=args.per_category
                ),
            },
            "concatenated (one softmax)": {
                "reference-following": reference_score(
                    manager, args.model, concat, args.cases, concatenated=True
                ),
                "prompt-following (toy GenEval with references)": geneval_with_references(
                    manager, args.model, concat, per_category=args.per_category, concatenated=True
                ),
            },
            "toy-sd alone (toy GenEval)": geneval_for(
                args.model, guidance=4.0, samples=1, per_category=args.per_category, manager=manager
            ),
        }
    else:
        report["ablation"] = f"not trained: {args.ablation} is missing (train it with --ablation)"
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
