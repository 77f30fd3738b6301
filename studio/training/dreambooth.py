"""DreamBooth (Ruiz et al. 2023, "DreamBooth: Fine Tuning Text-to-Image Diffusion Models for
Subject-Driven Generation").

The whole UNet is fine-tuned on the instance pictures under a rare word ("a sks shape").
Prior preservation (eq. 2) adds λ·‖ε̂(z_t', t', c_pr) − ε'‖² on pictures the base model made
of the class ("a shape"), so the class keeps its meaning (no language drift). Several class
prompts (one per line) widen c_pr into a regularisation set: picture i is made from prompt
i mod n and trained under it, so compositions the single class never shows (two objects,
relations, counts) are held in place too. Those class pictures are generated once per
(model, class prompts, resolution, seed) and cached.

With the base-model prior target the class term's target ε' becomes the frozen base model's
own prediction ε̂_base(z_t', t', c_pr) at the same noisy class latent: the trained model is
asked to predict there what the base model predicts, the quantity eq. 2 reaches through
generated pictures, without regressing one noise draw.
"""

from __future__ import annotations

import copy
import hashlib
from contextlib import nullcontext
from pathlib import Path

import torch
from PIL import Image

from .settings import TrainingSettings

CLASS_BATCH = 8


def prepare(pipe, s: TrainingSettings) -> tuple[list, None]:
    pipe.text_encoder.requires_grad_(s.train_text_encoder)
    pipe.unet.requires_grad_(True)
    modules = [pipe.unet] + ([pipe.text_encoder] if s.train_text_encoder else [])
    return [p for m in modules for p in m.parameters()], None


def frozen_base(pipe, s: TrainingSettings):
    """The base model for the prior term's base-model target: a frozen copy of what trains
    (the UNet, and the text encoder where it trains too), taken before training starts."""
    unet = copy.deepcopy(pipe.unet).requires_grad_(False)
    text_encoder = (
        copy.deepcopy(pipe.text_encoder).requires_grad_(False) if s.train_text_encoder else pipe.text_encoder
    )
    return lambda: nullcontext((unet, text_encoder))


def save(pipe, s: TrainingSettings, folder: Path) -> Path:
    """The whole fine-tuned pipeline as a diffusers folder `folder/<name>`."""
    target = folder / s.output_name
    pipe.save_pretrained(target, safe_serialization=True)
    return target


def class_pictures(
    pipe, s: TrainingSettings, source: str, resolution: int, cache: Path, defaults: dict, report
) -> tuple[list, list[str]]:
    """`s.class_images` pictures of the class prompts (cycled) by the base model (before any
    training patch), read from `cache` where an earlier run made them; and each one's prompt."""
    prompts = s.class_prompts
    captions = [prompts[i % len(prompts)] for i in range(s.class_images)]
    key = hashlib.sha256(f"{source}|{chr(10).join(prompts)}|{resolution}|{s.seed}".encode()).hexdigest()[:16]
    folder = cache / key
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompt.txt").write_text(f"{source}\n" + "\n".join(prompts) + "\n")
    pictures = []
    for start in range(0, s.class_images, CLASS_BATCH):
        indices = range(start, min(start + CLASS_BATCH, s.class_images))
        missing = [i for i in indices if not (folder / f"{i:04d}.png").is_file()]
        if missing:
            generators = [torch.Generator().manual_seed(s.seed * 100_003 + i) for i in missing]
            images = pipe(
                [captions[i] for i in missing],
                num_inference_steps=defaults.get("steps", 25),
                guidance_scale=defaults.get("guidance", 7.5),
                width=resolution,
                height=resolution,
                generator=generators,
            ).images
            for i, image in zip(missing, images, strict=True):
                image.save(folder / f"{i:04d}.png")
        pictures += [Image.open(folder / f"{i:04d}.png").convert("RGB") for i in indices]
        report(len(pictures), s.class_images)
    return pictures, captions
