"""Teaching toy-sd the held-out star: LoRA-DreamBooth with and without prior preservation,
Textual Inversion, LoRA size and fusing, all through the studio's trainer.

    python bench/bench_trainer.py [--steps 1500] [--learning-rate 2e-3] [--samples 64] [--per-category 16]
                                  [--geneval-samples 4] [--class-captions 60] [--prior-weight 3.0]
                                  [--train-seeds 0 ...] [--runs NAME,...]
                                  [--out runs/bench_trainer]

The base models never saw a star (../shared/toyworld.md). Five rendered large stars, one on
the left, right, top, bottom and one anywhere, captioned "a sks shape <position>" (each drawn
until its toy-VAE round trip still reads as a star: that VAE never saw a star either, and
small ones come back as pentagons), are the instance pictures.

LoRA-DreamBooth: rank 16 on the UNet's cross-attention keys and values (the layers that read
the text, as Custom Diffusion trains; Kumari et al. 2023) plus the text encoder's attention,
LR 2e-3, 4 instance (+ 4 class) pictures a step, the class term weighted λ = 3. Prior
preservation's class set is a regularisation set: "a shape" and 60 captions of the world's
own caption distribution (none in the toy GenEval set), 120 pictures the base model made of
them, since one class prompt shows only single shapes and lets two-object, relation and
counting scenes drift. The class views regress to the frozen base model's own prediction
(the trainer's default prior target, "base-model"), each ε error counted at least as the
error it implies in the clean latent x̂_0, so that the layout the base model gives ordinary
prompts at high noise is held too; the same run with Ruiz et al.'s target, the noise that
made z_t ("class-pictures"), is beside it. For contrast: the same with the UNet alone (text
encoder frozen), with a regularisation set of twice the world's share of two-object captions
(60% against 30%, where the drift falls), with the single class "a shape", without prior
preservation, and a wide LoRA (attention, feed-forward, proj and resnet convs) with the
regularisation set.
Textual Inversion: one new word <sks> from "shape", LR 5e-3. Pivotal tuning: the K/V LoRA
with prior preservation (text encoder frozen) trained on "a <sks> shape" on top of it.

Prints JSON: the star rate of "a sks shape on the left" (judge, one sample a seed); toy
GenEval on ordinary prompts for the base model and each trained model (the same prompts and
seeds for every model, so differences are paired; 4 seeds a prompt, since with one, two runs
of the same model differ by several points) and the drop's standard error from the paired
per-sample differences (about 2.3 points at 384 samples: a single run's drop is known no
better than that); training wall time on this machine; file
sizes; and the largest pixel difference between the unfused LoRA and the same LoRA fused
into the weights (W' = W + (α/r)·B·A).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

KV_TARGETS = ("attn2.to_k", "attn2.to_v")
WIDE_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
)


POSITIONS = ("on the left", "on the right", "at the top", "at the bottom", "")


def instance_pictures(folder: Path, vae, seed: int = 1) -> list[Path]:
    """One large star per position phrase (and one anywhere), each captioned "a sks shape
    <position>" in a same-name .txt file; drawn until the toy VAE's round trip still reads
    as a star."""
    import torch
    from PIL import Image

    from studio.toyworld import judge
    from studio.toyworld.captions import parse_caption, sample_scene
    from studio.toyworld.render import render
    from studio.toyworld.train.common import images_to_tensor

    folder.mkdir(parents=True, exist_ok=True)
    rng, paths = random.Random(seed), []
    for i, position in enumerate(POSITIONS):
        while True:
            scene = sample_scene(
                parse_caption(f"a large shape {position}".strip()), rng, shape_pool=("star",)
            )
            picture = render(scene)
            with torch.no_grad():
                back = vae.decode(vae.encode(images_to_tensor([picture])).latent_dist.mode()).sample
            array = ((back[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            if any(s.kind == "star" for s in judge.read(Image.fromarray(array)).shapes):
                break
        paths.append(folder / f"star-{i}.png")
        picture.save(paths[-1])
        paths[-1].with_suffix(".txt").write_text(f"a sks shape {position}".strip())
    return paths


PAIR_SHARE = 0.6  # two-object captions in the pair-weighted regularisation set (the world: 0.3)


def world_captions(n: int, per_category: int, pair_share: float | None = None, seed: int = 77) -> list[str]:
    """`n` distinct captions of the world's training distribution, none in the toy GenEval
    set the bench scores (`per_category` prompts a category); with `pair_share`, that share
    of them two-object captions ("and", "to the left of", "above"; the world has 30%)."""
    from studio.toyworld.captions import format_caption, sample_spec
    from studio.toyworld.geneval import prompt_set

    evaluated = {p for _, p in prompt_set(per_category)}
    pairs = n if pair_share is None else round(pair_share * n)
    room = {True: pairs, False: n if pair_share is None else n - pairs}  # places left, by "is two-object"
    rng, captions = random.Random(seed), []
    while len(captions) < n:
        spec = sample_spec(rng)
        caption, two_objects = format_caption(spec), spec.relation is not None
        if caption in evaluated or caption in captions or room[two_objects] == 0:
            continue
        captions.append(caption)
        room[two_objects] -= 1
    return captions


def ti_pictures(pictures: list[Path]) -> Path:
    """The same pictures with their captions' sks written as the new word <sks>."""
    import shutil

    folder = pictures[0].parent.with_name("instances-ti")
    folder.mkdir(exist_ok=True)
    for path in pictures:
        shutil.copy(path, folder / path.name)
        caption = path.with_suffix(".txt").read_text().replace("sks", "<sks>")
        (folder / path.name).with_suffix(".txt").write_text(caption)
    return folder


class Context:
    """What studio.jobs hands a job, for a bench that runs the trainer in its own process."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir

    def report(self, step, total, message="", **metrics):
        if metrics and step % 250 == 0:
            print(f"  step {step}/{total} loss {metrics['loss']:.4f}", file=sys.stderr, flush=True)

    def add_sample(self, path):
        pass

    def check_cancel(self):
        pass


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--ti-steps", type=int, default=1500)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument(
        "--per-category",
        type=int,
        default=16,
        help="toy GenEval prompts per category (at most 18: single-object prompts are 6 colours × 3 shapes)",
    )
    parser.add_argument("--geneval-samples", type=int, default=4, help="toy GenEval seeds per prompt")
    parser.add_argument(
        "--class-captions", type=int, default=60, help="world captions in the regularisation set"
    )
    parser.add_argument("--learning-rate", type=float, default=2e-3, help="of the LoRA runs")
    parser.add_argument(
        "--prior-weight",
        type=float,
        default=3.0,
        help="λ of the prior-preservation loss (Ruiz et al. eq. 2; they use 1). On the toy-sd that reads "
        "position words, λ = 1 let two-object and relation prompts drift 6.3 points (training seed 0); 3 holds "
        "them (training seeds 0 / 1 / 2: -0.3 / 3.4 / 0.5 points, against 77 without prior preservation)",
    )
    parser.add_argument(
        "--train-seeds",
        type=int,
        nargs="+",
        default=[0],
        help="train each run once per seed (a single run says little about drift); rows per seed and means",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench_trainer"))
    parser.add_argument("--runs", default="", help="comma-separated run names (default: all)")
    args = parser.parse_args()

    import torch

    from studio.models import LoraRef, ModelManager
    from studio.toyworld import judge
    from studio.toyworld.geneval import CATEGORIES, evaluate
    from studio.training import trainer
    from studio.training.settings import TrainingSettings
    from studio.txt2img import Txt2ImgSettings
    from studio.txt2img import run as txt2img

    torch.manual_seed(0)
    models = ModelManager(device="cpu", user_dir=args.out / "library")
    with models.lend("toy-sd") as pipe:
        pictures = instance_pictures(args.out / "instances", pipe.vae)

    def images(prompts, seeds, **extra):
        out = []
        for prompt, seed in zip(prompts, seeds, strict=True):
            out += txt2img(Txt2ImgSettings(prompt=prompt, model="toy-sd", seed=seed, **extra), models).images
        return out

    def star_rate(prompt, **extra):
        seeds = range(1000, 1000 + args.samples)
        found = images([prompt] * args.samples, seeds, **extra)
        return sum(any(s.kind == "star" for s in judge.read(im).shapes) for im in found) / args.samples

    def geneval(**extra):
        """[overall, per category] and each scored sample's outcome, in the prompt set's order."""
        result = evaluate(
            lambda p, s: images(p, s, **extra),
            samples_per_prompt=args.geneval_samples,
            per_category=args.per_category,
        )
        outcomes = [ok for category, _, _, ok in result.rows if category in CATEGORIES]
        return [round(result.overall, 3), {k: round(v, 3) for k, v in result.per_category.items()}], outcomes

    report = {"instances": [p.name for p in pictures], "samples": args.samples}
    base_geneval, base_outcomes = geneval()
    report["base"] = {"geneval": base_geneval, "star_rate_sks": star_rate("a sks shape on the left")}
    common = dict(
        model="toy-sd",
        seed=0,
        batch_size=4,
        images=str(pictures[0].parent),
        instance_prompt="a sks shape",
    )
    on_word = dict(images=str(ti_pictures(pictures)), instance_prompt="a <sks> shape")
    every = dict(checkpoint_every=args.steps, sample_every=args.steps)
    lora = dict(
        method="lora",
        steps=args.steps,
        learning_rate=args.learning_rate,
        rank=16,
        alpha=16,
        targets=KV_TARGETS,
        **every,
    )
    class_prompts = "\n".join(("a shape", *world_captions(args.class_captions, args.per_category)))
    weight = args.prior_weight
    prior = dict(
        prior_preservation=True,
        prior_weight=weight,
        class_prompt=class_prompts,
        class_images=2 * args.class_captions,
    )
    # the drift falls on two-object scenes: a regularisation set with twice the world's share of them
    pair_captions = world_captions(args.class_captions, args.per_category, pair_share=PAIR_SHARE)
    pair_weighted = {**prior, "class_prompt": "\n".join(("a shape", *pair_captions))}
    one_class = dict(
        prior_preservation=True,
        prior_weight=weight,
        class_prompt="a shape",
        class_images=2 * args.class_captions,
    )
    with_text = dict(train_text_encoder=True)
    runs = {
        "lora_dreambooth_prior": TrainingSettings(**common, **lora, **prior, **with_text, name="star-prior"),
        # Ruiz et al.'s own target for the class views: the noise that made z_t
        "lora_dreambooth_prior_class_pictures": TrainingSettings(
            **common, **lora, **prior, **with_text, prior_target="class-pictures", name="star-prior-ruiz"
        ),
        # the UNet alone (diffusers' DreamBooth-LoRA default): no text-encoder drift to preserve against
        "lora_dreambooth_prior_unet_only": TrainingSettings(
            **common, **lora, **prior, name="star-prior-unet"
        ),
        "lora_dreambooth_prior_pair_weighted": TrainingSettings(
            **common, **lora, **pair_weighted, **with_text, name="star-prior-pairs"
        ),
        "lora_dreambooth_one_class_prompt": TrainingSettings(
            **common, **lora, **one_class, **with_text, name="star-one-class"
        ),
        "lora_dreambooth_no_prior": TrainingSettings(**common, **lora, **with_text, name="star-no-prior"),
        "wide_lora_prior": TrainingSettings(
            **common, **{**lora, "targets": WIDE_TARGETS}, **prior, **with_text, name="star-wide"
        ),
        "textual_inversion": TrainingSettings(
            **{**common, **on_word},
            method="textual-inversion",
            steps=args.ti_steps,
            learning_rate=5e-3,
            token="<sks>",
            initializer="shape",
            checkpoint_every=args.ti_steps,
            sample_every=args.ti_steps,
            name="star-ti",
        ),
        # pivotal tuning: a UNet-only LoRA with prior preservation on top of the learned word
        "lora_on_word_prior": TrainingSettings(**{**common, **on_word}, **lora, **prior, name="star-on-word"),
    }
    chosen = [r for r in args.runs.split(",") if r] or list(runs)
    if unknown := set(chosen) - set(runs):
        parser.error(f"unknown runs {sorted(unknown)}; known: {', '.join(runs)}")
    base_score = report["base"]["geneval"][0]
    for key in chosen:
        rows = {}
        for seed in args.train_seeds:
            settings = runs[key].replace(seed=seed)
            print(f"{key} seed {seed} ...", file=sys.stderr, flush=True)
            started = time.perf_counter()
            out = args.out / key / f"seed-{seed}" if len(args.train_seeds) > 1 else args.out / key
            result = trainer.run(settings, models, Context(out))
            row = {
                "train_seconds": round(time.perf_counter() - started, 1),
                "file_bytes": result["output_bytes"],
            }
            word = "<sks>" if "<sks>" in settings.instance_prompt else "sks"
            stack = {"loras": (LoraRef(settings.output_name, 1.0),)} if settings.method == "lora" else {}
            row["star_rate_sks"] = star_rate(f"a {word} shape on the left", **stack)
            row["geneval"], outcomes = geneval(**stack)
            row["geneval_drop"] = round(base_score - row["geneval"][0], 3)
            row["geneval_drop_se"] = paired_standard_error(base_outcomes, outcomes)
            rows[seed] = row
            print(json.dumps({key: {seed: row}}), file=sys.stderr, flush=True)
        report[key] = rows[args.train_seeds[0]] if len(rows) == 1 else {"seeds": rows, **means(rows)}

    report["unet_bytes"] = sum(p.numel() * p.element_size() for p in models.base("toy-sd").unet.parameters())
    fused = args.out / "library" / "loras" / "star-prior.safetensors"
    if "lora_dreambooth_prior" in chosen:
        report["fused_max_pixel_difference"] = fused_difference(models, fused)
    print(json.dumps(report, indent=1))


def means(rows: dict) -> dict:
    """The mean star rate, toy GenEval score and drop below the base over training seeds, and
    the mean drop's standard error from the seeds' spread (training and measurement noise)."""

    def mean(values):
        return round(sum(values) / len(values), 3)

    drops = [r["geneval_drop"] for r in rows.values()]
    return {
        "mean_star_rate_sks": mean([r["star_rate_sks"] for r in rows.values()]),
        "mean_geneval": mean([r["geneval"][0] for r in rows.values()]),
        "mean_geneval_drop": mean(drops),
        "mean_geneval_drop_se": standard_error(drops),
        "max_geneval_drop": max(drops),
    }


def paired_standard_error(base: list[bool], trained: list[bool]) -> float:
    """The standard error of the drop, from the per-sample differences of the two models on
    the same prompts and seeds (the overall score is the plain mean: every category has as
    many samples)."""
    return standard_error([int(b) - int(t) for b, t in zip(base, trained, strict=True)])


def standard_error(values: list[float]) -> float:
    """`metrics.standard_error` of `values`, to 3 places."""
    from studio.metrics import standard_error

    return round(standard_error(values), 3)


def fused_difference(models, lora_file: Path) -> int:
    """The largest 0–255 pixel difference between the LoRA applied on the fly and fused into W."""
    import numpy as np
    import torch

    with models.lend("toy-sd") as pipe:
        pipe.load_lora_weights(str(lora_file), adapter_name="star")
        try:
            kwargs = dict(prompt=["a sks shape on the left"] * 8, num_inference_steps=25, guidance_scale=4.0)
            unfused = pipe(**kwargs, generator=torch.Generator().manual_seed(7), output_type="np").images
            pipe.fuse_lora()
            fused = pipe(**kwargs, generator=torch.Generator().manual_seed(7), output_type="np").images
            pipe.unfuse_lora()
        finally:
            pipe.unload_lora_weights()
    return int(np.abs(np.round(unfused * 255) - np.round(fused * 255)).max())


if __name__ == "__main__":
    main()
