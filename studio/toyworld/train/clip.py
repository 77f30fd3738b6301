"""Stage 1: toy CLIP, a `CLIPModel` trained contrastively on (render, caption) pairs.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision"
(2021), eq. of §2.3: symmetric cross-entropy over the batch's cosine-similarity matrix
scaled by a learned temperature. Its text tower becomes the diffusion models' text
encoder, its vision tower the IP-Adapter image encoder, and the pair gives an offline
CLIP-Score.

Two legs. The joint leg trains both towers. After it, the vision leg trains the vision
tower alone against the frozen text tower, with a shape-swapped caption beside every
caption as a hard negative for the image (NegCLIP; Yuksekgonul et al., "When and why
vision-language models behave like bags-of-words", ICLR 2023, §5): the joint leg's
pictures are told apart by colour long before shape, and its pooled image embedding names
the shape of a single-shape render only about 6 times in 10 (a linear probe on 1,500
renders; colour: 10 in 10), which caps what an IP-Adapter can copy from a reference. The
text tower, which the diffusion models read, is the joint leg's unchanged.
"""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..captions import CaptionSpec, ObjectSpec, sample_scene
from ..render import render
from ..world import COLOR_SHAPES, COLORS, SHAPES
from .common import (
    MAX_TOKENS,
    batch_rng,
    build_tokenizer,
    cosine_decay,
    images_to_tensor,
    load_checkpoint,
    log,
    pick_device,
    sample_batch,
    save_checkpoint,
    save_tokenizer,
    warmup_lr,
)

SEED = 1
STEPS = 1000
BATCH = 128
LR = 1e-3
VISION_STEPS = 1500
VISION_LR = 1e-3
SHAPE_WORD = re.compile(rf"\b({'|'.join(SHAPES)})(s?)\b")
COLOR_WORD = re.compile(rf"\b({'|'.join(COLORS)})\b")


def build_model(tokenizer):
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=128,
    )
    vision = CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=64,
        patch_size=8,
        projection_dim=128,
    )
    return CLIPModel(
        CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=128)
    )


def clip_pixels(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] renders to the CLIP image processor's normalisation (saved with the model)."""
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    return ((images + 1) / 2 - mean.to(images)) / std.to(images)


def positives(captions: list[str], device, texts: list[str] | None = None) -> torch.Tensor:
    """Soft targets of each caption's image over `texts` (the captions themselves by
    default): identical captions in one batch are all positives of each other."""
    same = [[a == b for b in texts or captions] for a in captions]
    same = torch.tensor(same, device=device, dtype=torch.float32)
    return same / same.sum(1, keepdim=True)


def loss_on_batch(model, ids: torch.Tensor, pixel_values: torch.Tensor, captions: list[str]):
    """Symmetric InfoNCE over one batch; returns (loss, the model's output)."""
    device = ids.device
    out_ = model(input_ids=ids, pixel_values=pixel_values)
    targets = positives(captions, device)
    loss = (
        F.cross_entropy(out_.logits_per_text, targets) + F.cross_entropy(out_.logits_per_image, targets)
    ) / 2
    return loss, out_


def text_embeddings(model, ids: torch.Tensor) -> torch.Tensor:
    return F.normalize(model.text_projection(model.text_model(input_ids=ids).pooler_output), dim=-1)


def image_embeddings(model, pixel_values: torch.Tensor) -> torch.Tensor:
    return F.normalize(
        model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output), dim=-1
    )


def hard_negative(caption: str, rng: random.Random) -> str:
    """The caption with every shape word swapped for another shape ("circles" stays plural);
    one that names no shape gets its colours swapped instead."""
    if SHAPE_WORD.search(caption):
        return SHAPE_WORD.sub(lambda m: rng.choice([s for s in SHAPES if s != m[1]]) + m[2], caption)
    return COLOR_WORD.sub(lambda m: rng.choice([c for c in COLORS if c != m[1]]), caption)


def vision_loss_on_batch(model, tokenizer, captions: list[str], negatives: list[str], pixel_values):
    """Symmetric InfoNCE with the text tower frozen; the image side also has to rank its
    caption above every hard negative in the batch (a negative that is some caption of the
    batch, as "a shape" is its own, counts as that caption)."""
    device = pixel_values.device
    ids = tokenizer(
        captions + negatives, padding="max_length", truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        text = text_embeddings(model, ids.to(device))
    image = image_embeddings(model, pixel_values)
    n, scale, targets = len(captions), model.logit_scale.exp(), positives(captions, device)
    per_image = F.cross_entropy(scale * image @ text.T, positives(captions, device, captions + negatives))
    return (per_image + F.cross_entropy(scale * text[:n] @ image.T, targets)) / 2


def train(work: Path, out: Path, steps: int = STEPS) -> None:
    from transformers import CLIPImageProcessor

    device = pick_device()
    started = time.time()
    tokenizer = stage_tokenizer(work)
    model = build_model(tokenizer).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    ckpt = work / "clip.safetensors"
    start = load_checkpoint(ckpt, {"clip": model}, opt) if ckpt.exists() else 0
    model.train()
    for step in range(start, steps):
        captions, images = sample_batch(batch_rng(SEED, step), BATCH, generic_share=0.2)
        ids = tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt").input_ids
        for group in opt.param_groups:
            group["lr"] = warmup_lr(step, LR, 100) * (0.5 + 0.5 * (1 - step / steps))
        loss, out_ = loss_on_batch(model, ids.to(device), clip_pixels(images).to(device), captions)
        labels = torch.arange(len(captions), device=device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            acc = (out_.logits_per_text.argmax(1) == labels).float().mean().item()
            log("clip", step, steps, loss=loss.item(), acc=acc)
        if (step + 1) % 250 == 0:
            save_checkpoint(ckpt, {"clip": model}, opt, step + 1)
    save_checkpoint(ckpt, {"clip": model}, opt, steps)
    add_seconds(work, "joint", time.time() - started)
    started = time.time()
    train_vision_tower(model, tokenizer, work, VISION_STEPS)
    seconds = add_seconds(work, "vision", time.time() - started)
    model.eval()
    model.save_pretrained(out / "toy-clip", safe_serialization=True)
    save_tokenizer(tokenizer, out / "toy-clip")
    CLIPImageProcessor(
        size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}, do_convert_rgb=True
    ).save_pretrained(out / "toy-clip")
    write_clip_card(out / "toy-clip", model, tokenizer, steps, seconds)


def add_seconds(work: Path, leg: str, seconds: float) -> dict:
    """Each leg's wall time, summed over the runs that resumed it (work/clip_seconds.json)."""
    clock = work / "clip_seconds.json"
    spent = json.loads(clock.read_text()) if clock.exists() else {}
    spent[leg] = spent.get(leg, 0.0) + seconds
    clock.write_text(json.dumps(spent))
    return spent


def stage_tokenizer(work: Path):
    """The stage's tokenizer, kept in the work folder: build_tokenizer's ids vary between
    processes, and a resumed leg must read captions with the ids its weights learned."""
    from transformers import CLIPTokenizer

    folder = work / "clip_tokenizer"
    if not (folder / "vocab.json").exists():
        save_tokenizer(build_tokenizer(), folder)
    return CLIPTokenizer.from_pretrained(folder)


def train_vision_tower(model, tokenizer, work: Path, steps: int) -> None:
    """The vision leg (see above): vision tower, its projection and the temperature train."""
    device = model.logit_scale.device
    model.text_model.requires_grad_(False)
    model.text_projection.requires_grad_(False)
    trained = [*model.vision_model.parameters(), *model.visual_projection.parameters(), model.logit_scale]
    opt = torch.optim.AdamW(trained, lr=VISION_LR, weight_decay=0.01)
    ckpt = work / "clip_vision.safetensors"
    modules = {"clip": model}
    start = load_checkpoint(ckpt, modules, opt) if ckpt.exists() else 0
    model.train()
    for step in range(start, steps):
        rng = batch_rng(SEED + 1000, step)
        captions, images = sample_batch(rng, BATCH, generic_share=0.2)
        negatives = [hard_negative(c, rng) for c in captions]
        for group in opt.param_groups:
            group["lr"] = warmup_lr(step, VISION_LR, 50) * cosine_decay(step, steps, floor=0.0)
        loss = vision_loss_on_batch(model, tokenizer, captions, negatives, clip_pixels(images).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log("clip vision", step, steps, loss=loss.item())
        if (step + 1) % 250 == 0:
            save_checkpoint(ckpt, modules, opt, step + 1)
    save_checkpoint(ckpt, modules, opt, steps)


def write_clip_card(folder: Path, model, tokenizer, steps: int, seconds: dict | None = None) -> None:
    from .cards import hardware, write_card

    params = sum(p.numel() for p in model.parameters())
    write_card(
        folder,
        "toy-clip",
        "A `CLIPModel` (text and vision towers) trained contrastively on toy-world renders and captions. "
        "Its text tower is the toy diffusion models' text encoder, its vision tower the IP-Adapter image encoder.",
        {
            "data": f"{steps} steps × {BATCH} fresh (render, caption) pairs, 20% generic `shape` captions "
            f"(joint leg); then {VISION_STEPS} steps × {BATCH} more (vision leg)",
            "objective": "symmetric InfoNCE, identical captions in a batch counted as positives; in the vision "
            "leg the text tower is frozen and every caption has a shape-swapped hard negative (NegCLIP)",
            "parameters": f"{params / 1e6:.2f} M",
            "hardware": hardware(),
            **(
                {"time": " + ".join(f"{s:.0f} s ({leg} leg)" for leg, s in seconds.items())}
                if seconds
                else {}
            ),
        },
        evaluate(model, tokenizer),
    )


@torch.no_grad()
def evaluate(model, tokenizer, n: int = 256) -> dict:
    """Held-out renders: caption retrieval (top-1 among the batch's distinct captions), the
    mean cosine similarity of matching against shuffled pairs (CLIP-Score's raw form), and
    zero-shot reading of single shapes (anywhere, any size and background) among the 18
    captions "a COLOUR SHAPE": what an IP-Adapter has to copy from a reference."""
    model.eval()
    captions, images = sample_batch(batch_rng(SEED + 100, 0), n, generic_share=0.0)
    ids = tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt").input_ids
    sims = image_embeddings(model, clip_pixels(images)) @ text_embeddings(model, ids).T
    correct = [captions[int(j)] == captions[i] for i, j in enumerate(sims.argmax(1))]
    shuffled = torch.roll(torch.arange(n), 1)
    classes = COLOR_SHAPES
    rng = random.Random(SEED + 200)
    truth = [rng.randrange(len(classes)) for _ in range(n)]
    scenes = [sample_scene(CaptionSpec((ObjectSpec(*classes[k]),)), rng) for k in truth]
    class_ids = tokenizer(
        [f"a {c} {s}" for c, s in classes], padding="max_length", return_tensors="pt"
    ).input_ids
    pictures = clip_pixels(images_to_tensor([render(scene) for scene in scenes]))
    read = (image_embeddings(model, pictures) @ text_embeddings(model, class_ids).T).argmax(1).tolist()
    return {
        "image_to_caption_top1": round(sum(correct) / n, 4),
        "cosine_matching": round(sims.diag().mean().item(), 4),
        "cosine_shuffled": round(sims[torch.arange(n), shuffled].mean().item(), 4),
        "single_shape_zero_shot": {
            "colour_and_shape": round(sum(r == k for r, k in zip(read, truth, strict=True)) / n, 4),
            "shape": round(
                sum(classes[r][1] == classes[k][1] for r, k in zip(read, truth, strict=True)) / n, 4
            ),
        },
        "n": n,
    }
