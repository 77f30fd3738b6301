"""Stage 2: toy VAE, an `AutoencoderKL` with SD's geometry (f = 8, 4 latent channels).

Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models" (CVPR
2022), §3 and appendix G: reconstruction loss plus a small KL weight (here L1 + MSE,
KL 1e-6, no adversarial term: flat colours need none). After training, the latents'
standard deviation is measured on fresh renders and `scaling_factor = 1 / std` is
written into the config, as SD's 0.18215 was found.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from .common import (
    EMA,
    batch_rng,
    load_checkpoint,
    log,
    pick_device,
    sample_batch,
    save_checkpoint,
    warmup_lr,
)

SEED = 2
STEPS = 2200
BATCH = 32
LR = 5e-4
KL_WEIGHT = 1e-6


def build_model():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=64,
    )


def loss_on_batch(vae, images: torch.Tensor):
    """L1 + MSE reconstruction of a posterior sample plus KL_WEIGHT × KL; returns (loss, rec, recon)."""
    posterior = vae.encode(images).latent_dist
    recon = vae.decode(posterior.sample()).sample
    rec = F.l1_loss(recon, images) + F.mse_loss(recon, images)
    return rec + KL_WEIGHT * posterior.kl().mean(), rec, recon


def train(work: Path, out: Path, steps: int = STEPS) -> None:
    device = pick_device()
    vae = build_model().to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=LR, weight_decay=0.0)
    ema = EMA(vae, decay=0.995)
    ckpt = work / "vae.safetensors"
    start = load_checkpoint(ckpt, {"vae": vae}, opt, ema) if ckpt.exists() else 0
    vae.train()
    for step in range(start, steps):
        _, images = sample_batch(batch_rng(SEED, step), BATCH)
        images = images.to(device)
        for group in opt.param_groups:
            group["lr"] = warmup_lr(step, LR, 100) * (0.1 + 0.9 * (1 - step / steps))
        loss, rec, recon = loss_on_batch(vae, images)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        ema.update(vae)
        if step % 50 == 0 or step == steps - 1:
            log("vae", step, steps, rec=rec.item(), psnr=psnr(recon, images))
        if (step + 1) % 250 == 0:
            save_checkpoint(ckpt, {"vae": vae}, opt, step + 1, ema)
    save_checkpoint(ckpt, {"vae": vae}, opt, steps, ema)
    ema.copy_to(vae)
    vae.eval()
    vae.register_to_config(scaling_factor=measure_scaling_factor(vae, device))
    vae.save_pretrained(out / "toy-vae", safe_serialization=True)
    report = evaluate(vae, device)
    (work / "vae_eval.json").write_text(json.dumps(report, indent=2))
    print(f"[vae] held-out {report}", flush=True)


def psnr(recon: torch.Tensor, images: torch.Tensor) -> float:
    mse = F.mse_loss((recon.clamp(-1, 1) + 1) / 2, (images + 1) / 2).item()
    return float(10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-10))))


@torch.no_grad()
def measure_scaling_factor(vae, device, n: int = 512) -> float:
    _, images = sample_batch(batch_rng(SEED + 100, 0), n)
    latents = vae.encode(images.to(device)).latent_dist.sample()
    return round(1.0 / latents.std().item(), 5)


@torch.no_grad()
def evaluate(vae, device, n: int = 256) -> dict:
    """Held-out PSNR, and whether every palette colour comes back as itself."""
    from ..captions import sample_pair
    from ..judge import read
    from ..render import render
    from .common import images_to_tensor

    rng = batch_rng(SEED + 200, 0)
    scenes = [sample_pair(rng)[1] for _ in range(n)]
    images = images_to_tensor([render(s) for s in scenes]).to(device)
    recon = vae.decode(vae.encode(images).latent_dist.mode()).sample
    from PIL import Image

    arr = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    kept = 0
    for scene, a in zip(scenes, arr, strict=True):
        reading = read(Image.fromarray(a))
        truth = sorted((s.color, s.kind) for s in scene.shapes)
        kept += (
            reading.background == scene.background
            and sorted((s.color, s.kind) for s in reading.shapes) == truth
        )
    return {"psnr_db": round(psnr(recon, images), 2), "scenes_read_back": kept / n, "n": n}
