"""txt2img overhead and model switching, measured side by side in one run.

    python bench/bench_txt2img.py [--model toy-sd] [--other toy-sd3] [--steps 25] [--repeat 15]

1. Studio txt2img (settings, model manager, scheduler by name, callbacks) against the
   bare diffusers pipeline on the same model, steps and seed, interleaved run by run;
   prints the ratio of medians (target <= 1.05).
2. Switching between two models already in the cache (a cache hit) against loading
   one cold.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="toy-sd")
    parser.add_argument("--other", default=None, help="a second model for the switch timing")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()

    import torch
    from diffusers import DiffusionPipeline

    from studio.models import ModelManager
    from studio.schedulers import make_scheduler
    from studio.txt2img import Txt2ImgSettings, run

    manager = ModelManager()
    spec = manager.resolve(args.model)
    settings = Txt2ImgSettings(prompt="a red circle on the left", model=args.model, seed=1, steps=args.steps)
    resolved = run(settings, manager).settings  # warm-up, and the concrete values

    bare = DiffusionPipeline.from_pretrained(spec.source, dtype=torch.float32, **_absent(spec.source))
    bare.scheduler = make_scheduler(resolved.scheduler, spec.family, bare.scheduler.config)
    bare.set_progress_bar_config(disable=True)

    def bare_call():
        bare(
            resolved.prompt,
            num_inference_steps=resolved.steps,
            guidance_scale=resolved.guidance,
            width=resolved.width,
            height=resolved.height,
            generator=[torch.Generator("cpu").manual_seed(1)],
        )

    bare_call()
    ours, theirs = [], []
    for _ in range(args.repeat):
        t = time.perf_counter()
        run(settings, manager)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        bare_call()
        theirs.append(time.perf_counter() - t)
    o, b = statistics.median(ours), statistics.median(theirs)
    print(f"txt2img {args.model}, {args.steps} steps, {args.repeat} interleaved runs")
    print(f"  studio median {o * 1000:.1f} ms, bare diffusers median {b * 1000:.1f} ms, ratio {o / b:.3f}")

    if args.other:
        cold = ModelManager()
        t = time.perf_counter()
        cold.base(args.other)
        cold_s = time.perf_counter() - t
        manager.base(args.other)
        hits = []
        for i in range(20):
            name = args.model if i % 2 else args.other
            t = time.perf_counter()
            with manager.lend(name):
                pass
            hits.append(time.perf_counter() - t)
        hit = statistics.median(hits)
        print(f"model switch {args.model} <-> {args.other}")
        print(
            f"  cache hit median {hit * 1000:.2f} ms, cold load {cold_s * 1000:.0f} ms, ratio {hit / cold_s:.4f}"
        )


def _absent(source: str) -> dict:
    from studio.models import _absent_components

    return _absent_components(Path(source))


if __name__ == "__main__":
    main()
