"""Retrain the toy model family: `python -m studio.toyworld.train [all|clip|vae|sd|ip2p|sd3|controlnet|ip_adapter] [--work DIR] [--out DIR]`.

Every stage checkpoints into --work and resumes from there after an interruption; a
finished stage's model folder in --out is kept and skipped unless --force is given.
On a GPU, `--batch` and `--minutes` trade the CPU-sized defaults for larger batches and
as many steps as fit in a wall-clock budget (sd, ip2p, sd3, controlnet, ip_adapter).
"""

from __future__ import annotations

import argparse
import inspect
import time
from pathlib import Path

STAGES = ("clip", "vae", "sd", "ip2p", "sd3", "controlnet", "ip_adapter")
FOLDERS = {
    "clip": "toy-clip",
    "vae": "toy-vae",
    "sd": "toy-sd",
    "ip2p": "toy-instruct-pix2pix",
    "sd3": "toy-sd3",
    "controlnet": "toy-sd-controlnet-seg",  # the second of the two it trains
    "ip_adapter": "toy-ip-adapter",
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studio.toyworld.train", description=__doc__)
    parser.add_argument("stage", nargs="?", default="all", choices=("all",) + STAGES)
    parser.add_argument("--work", type=Path, default=Path("runs/toyworld"))
    parser.add_argument("--out", type=Path, default=Path("assets/models"))
    parser.add_argument("--steps", type=int, default=None, help="override the stage's step count")
    parser.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="train as many steps as fit in this many minutes (--steps, if given, caps them); "
        "with `all`, the stages that take a budget do (clip and vae keep their step counts)",
    )
    parser.add_argument("--batch", type=int, default=None, help="override the stage's batch size")
    parser.add_argument(
        "--text-steps", type=int, default=None, help="sd3: override the steps of its text-tuning phase"
    )
    parser.add_argument(
        "--tune-shipped",
        action="store_true",
        help="sd3: run only its composite-tuning phase, on the toy-sd3 in --out (--steps / --minutes size it)",
    )
    parser.add_argument("--force", action="store_true", help="retrain stages whose folder exists")
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="ip_adapter: train the concatenated-attention ablation instead (into --work, not shipped)",
    )
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    for stage in STAGES if args.stage == "all" else (args.stage,):
        if (args.out / FOLDERS[stage]).exists() and not args.force and args.stage == "all":
            print(f"[{stage}] {args.out / FOLDERS[stage]} exists; skipped (use --force to retrain)")
            continue
        module = __import__(f"studio.toyworld.train.{stage}", fromlist=["train"])
        started = time.time()
        kwargs = {"steps": args.steps} if args.steps else {}
        if args.minutes and "budget" in inspect.signature(module.train).parameters:
            kwargs = {"steps": args.steps or 10**9, "budget": args.minutes * 60}
        elif args.minutes and args.stage != "all":
            parser.error(f"--minutes: the {stage} stage trains a fixed number of steps (use --steps)")
        if args.batch:
            module.BATCH = args.batch
        if args.text_steps is not None:
            if stage != "sd3":
                parser.error("--text-steps is a flag of the sd3 stage")
            module.TEXT_STEPS = args.text_steps
        if args.ablation:
            if stage != "ip_adapter":
                parser.error("--ablation is a flag of the ip_adapter stage")
            kwargs["ablation"] = True
        if args.tune_shipped:
            if stage != "sd3":
                parser.error("--tune-shipped is a flag of the sd3 stage")
            module.tune_shipped(args.work, args.out, **kwargs)
        else:
            module.train(args.work, args.out, **kwargs)
        print(f"[{stage}] done in {time.time() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
