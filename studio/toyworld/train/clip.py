"""Stage 1: toy CLIP, a `CLIPModel` trained contrastively on (render, caption) pairs.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision"
(2021), eq. of §2.3: symmetric cross-entropy over the batch's cosine-similarity matrix
scaled by a learned temperature. Its text tower becomes the diffusion models' text
encoder, its vision tower the IP-Adapter image encoder, and the pair gives an offline
CLIP-Score.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .common import (
    MAX_TOKENS,
    batch_rng,
    build_tokenizer,
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


def loss_on_batch(model, ids: torch.Tensor, pixel_values: torch.Tensor, captions: list[str]):
    """Symmetric InfoNCE over one batch; returns (loss, the model's output)."""
    device = ids.device
    out_ = model(input_ids=ids, pixel_values=pixel_values)
    # Identical captions in one batch are all positives of each other.
    same = torch.tensor([[a == b for b in captions] for a in captions], device=device, dtype=torch.float32)
    targets = same / same.sum(1, keepdim=True)
    loss = (
        F.cross_entropy(out_.logits_per_text, targets) + F.cross_entropy(out_.logits_per_image, targets)
    ) / 2
    return loss, out_


def train(work: Path, out: Path, steps: int = STEPS) -> None:
    from transformers import CLIPImageProcessor

    device = pick_device()
    tokenizer = build_tokenizer()
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
    model.eval()
    model.save_pretrained(out / "toy-clip", safe_serialization=True)
    save_tokenizer(tokenizer, out / "toy-clip")
    CLIPImageProcessor(
        size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}, do_convert_rgb=True
    ).save_pretrained(out / "toy-clip")
    write_clip_card(out / "toy-clip", model, tokenizer, steps)


def write_clip_card(folder: Path, model, tokenizer, steps: int, seconds: float | None = None) -> None:
    from .cards import hardware, write_card

    params = sum(p.numel() for p in model.parameters())
    write_card(
        folder,
        "toy-clip",
        "A `CLIPModel` (text and vision towers) trained contrastively on toy-world renders and captions. "
        "Its text tower is the toy diffusion models' text encoder, its vision tower the IP-Adapter image encoder.",
        {
            "data": f"{steps} steps × {BATCH} fresh (render, caption) pairs, 20% generic `shape` captions",
            "objective": "symmetric InfoNCE, identical captions in a batch counted as positives",
            "parameters": f"{params / 1e6:.2f} M",
            "hardware": hardware(),
            **({"time": f"{seconds:.0f} s"} if seconds else {}),
        },
        evaluate(model, tokenizer),
    )


@torch.no_grad()
def evaluate(model, tokenizer, n: int = 256) -> dict:
    """Held-out renders: caption retrieval (top-1 among the batch's distinct captions) and
    the mean cosine similarity of matching against shuffled pairs (CLIP-Score's raw form)."""
    model.eval()
    captions, images = sample_batch(batch_rng(SEED + 100, 0), n, generic_share=0.0)
    ids = tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt").input_ids
    text = F.normalize(model.text_projection(model.text_model(input_ids=ids).pooler_output), dim=-1)
    pooled = model.vision_model(pixel_values=clip_pixels(images)).pooler_output
    image = F.normalize(model.visual_projection(pooled), dim=-1)
    sims = image @ text.T
    correct = [captions[int(j)] == captions[i] for i, j in enumerate(sims.argmax(1))]
    shuffled = torch.roll(torch.arange(n), 1)
    return {
        "image_to_caption_top1": round(sum(correct) / n, 4),
        "cosine_matching": round(sims.diag().mean().item(), 4),
        "cosine_shuffled": round(sims[torch.arange(n), shuffled].mean().item(), 4),
        "n": n,
    }
