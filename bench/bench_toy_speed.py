"""Seconds per toy image against the floor: denoiser forwards × one forward's time.

    python bench/bench_toy_speed.py [--models toy-sd toy-sd3] [--steps 25] [--repeat 10]

The floor is what the denoiser alone costs (one batched CFG forward a step); the ratio
shows what the rest of the pipeline (text encoding, scheduler, VAE decode) adds.
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
    parser.add_argument("--models", nargs="+", default=["toy-sd"])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()

    import torch

    from studio.models import ModelManager
    from studio.txt2img import Txt2ImgSettings, run

    manager = ModelManager()
    for name in args.models:
        if not Path(manager.resolve(name).source).exists():
            print(f"{name}: not trained yet, skipped")
            continue
        settings = Txt2ImgSettings(prompt="a red circle on the left", model=name, seed=0, steps=args.steps)
        run(settings, manager)  # warm-up
        pipe = manager.base(name)
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        calls, inputs = [], {}

        def grab(module, a, kw, calls=calls, inputs=inputs):
            calls.append(1)
            inputs.setdefault("args", a)
            inputs.setdefault("kwargs", kw)

        handle = denoiser.register_forward_pre_hook(grab, with_kwargs=True)
        totals = []
        for _ in range(args.repeat):
            calls.clear()
            t = time.perf_counter()
            run(settings, manager)
            totals.append(time.perf_counter() - t)
        handle.remove()
        forwards = len(calls)
        one = []
        with torch.no_grad():
            for _ in range(args.repeat * 5):
                t = time.perf_counter()
                denoiser(*inputs["args"], **inputs["kwargs"])
                one.append(time.perf_counter() - t)
        total, floor = statistics.median(totals), forwards * statistics.median(one)
        print(
            f"{name}: {total:.3f} s/image ({args.steps} steps), floor {forwards} forwards × "
            f"{statistics.median(one) * 1000:.2f} ms = {floor:.3f} s, ratio {total / floor:.2f}"
        )


if __name__ == "__main__":
    main()
