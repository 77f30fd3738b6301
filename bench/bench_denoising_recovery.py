"""Does a model keep a correct picture when it denoises it from σ? SDEdit from the ground truth.

    python bench/bench_denoising_recovery.py [--models toy-sd toy-sd3] [--strengths 0.05 0.3 0.5 1]
                                             [--seeds 2]

For each two-object and relation prompt of toy GenEval (24) a correct picture is rendered
(the judge passes it), noised to `strength` and denoised with the prompt by studio.sdedit
(the model's own scheduler, steps and guidance); the bench prints how many results the
judge still passes, per model and strength. Strength 1 is plain generation, so the column
drop from a small strength to 1 shows at which noise levels a model loses what the prompt
asked for. Measured 2026-12-07 on 2 CPU cores (2 seeds, of 48, at σ 0.05 / 0.3 / 0.5 / 1):
toy-sd 47 / 45 / 41 / 38, toy-sd3 45 / 38 / 28 / 15. The MM-DiT already spoils small shapes
at low-to-mid noise, where the UNet keeps them; guidance 1 changes toy-sd3's numbers by
at most 2, and the VAE round trip (σ 0.05) is not the cause.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["toy-sd", "toy-sd3"])
    parser.add_argument("--strengths", nargs="+", type=float, default=[0.05, 0.3, 0.5, 1.0])
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()

    from studio.models import ModelManager
    from studio.sdedit import SDEditSettings, run
    from studio.toyworld.captions import parse_caption, sample_scene
    from studio.toyworld.geneval import prompt_set
    from studio.toyworld.judge import satisfies
    from studio.toyworld.render import render

    prompts = [p for category, p in prompt_set() if category in ("two_objects", "relation")]
    rng = random.Random(0)
    truths = [render(sample_scene(parse_caption(p), rng)) for p in prompts]
    total = len(prompts) * args.seeds
    print(f"ground truth passes {sum(map(satisfies, truths, prompts))} of {len(prompts)}")
    print("model      " + "".join(f"  σ {s:<5g}" for s in args.strengths) + f"  (of {total})")
    manager = ModelManager()
    for name in args.models:
        kept = []
        for strength in args.strengths:
            ok = 0
            for seed in range(args.seeds):
                for prompt, truth in zip(prompts, truths, strict=True):
                    settings = SDEditSettings(prompt=prompt, model=name, seed=seed, strength=strength)
                    ok += satisfies(run(settings, truth, manager).images[0], prompt)
            kept.append(ok)
        print(f"{name:<10} " + "".join(f"  {k:>7}" for k in kept))


if __name__ == "__main__":
    main()
