"""Score a toy model on toy GenEval: `python -m studio.toyworld.evaluate --model toy-sd [--guidance 1 4 7]`.

Images are generated in batches through the model manager's pipeline (the same one the
studio lends), each prompt with seeds 0..N-1, and judged by the toy-world judge.
"""

from __future__ import annotations

import argparse
import json
import time

from .geneval import evaluate


def geneval_for(
    model: str,
    *,
    guidance: float,
    steps: int = 25,
    samples: int = 2,
    per_category: int = 12,
    scheduler: str | None = None,
    manager=None,
) -> dict:
    import torch

    from ..models import ModelManager
    from ..schedulers import make_scheduler

    manager = manager or ModelManager()
    spec = manager.resolve(model)
    scheduler = scheduler or spec.defaults.get("scheduler", "DDIM")

    def generate(prompts, seeds):
        with manager.lend(model) as pipe:
            pipe.scheduler = make_scheduler(scheduler, spec.family, pipe.scheduler.config)
            return pipe(
                list(prompts),
                num_inference_steps=steps,
                guidance_scale=guidance,
                width=64,
                height=64,
                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            ).images

    started = time.perf_counter()
    result = evaluate(generate, samples_per_prompt=samples, per_category=per_category)
    return {
        "model": model,
        "guidance": guidance,
        "steps": steps,
        "scheduler": scheduler,
        "samples": result.samples,
        "seconds": round(time.perf_counter() - started, 1),
        "overall": round(result.overall, 4),
        "per_category": {k: round(v, 4) for k, v in result.per_category.items()},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="toy-sd")
    parser.add_argument("--guidance", type=float, nargs="+", default=[4.0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--samples", type=int, default=2, help="seeds per prompt")
    parser.add_argument("--per-category", type=int, default=12)
    parser.add_argument("--scheduler", default=None)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    results = []
    for g in args.guidance:
        r = geneval_for(
            args.model,
            guidance=g,
            steps=args.steps,
            samples=args.samples,
            per_category=args.per_category,
            scheduler=args.scheduler,
        )
        print(json.dumps(r), flush=True)
        results.append(r)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
