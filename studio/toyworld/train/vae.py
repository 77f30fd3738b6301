"""Stage 2: toy VAE, an `AutoencoderKL` with SD's geometry (f = 8, 4 latent channels).

Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models" (CVPR
2022), §3 and appendix G: reconstruction loss plus a small KL weight (here L1 + MSE + an
L1 on image gradients that keeps corners sharp, KL 1e-6, no adversarial term: flat
colours need none). The full-resolution blocks are narrow (16 channels): flat colours
need few features there, and they dominate the cost on a CPU. After training, the latents'
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
STEPS = 4000
BATCH = 16
LR = 5e-4
KL_WEIGHT = 1e-6


def build_model():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 64, 128),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )


def loss_on_batch(vae, images: torch.Tensor):
    """L1 + MSE + gradient-L1 reconstruction of a posterior sample plus KL_WEIGHT × KL; returns (loss, rec, recon)."""
    posterior = vae.encode(images).latent_dist
    recon = vae.decode(posterior.sample()).sample
    rec = F.l1_loss(recon, images) + F.mse_loss(recon, images) + gradient_l1(recon, images)
    return rec + KL_WEIGHT * posterior.kl().mean(), rec, recon


def gradient_l1(recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """L1 between horizontal and vertical finite differences: penalises blurred edges and corners."""
    dx = F.l1_loss(recon[..., :, 1:] - recon[..., :, :-1], images[..., :, 1:] - images[..., :, :-1])
    dy = F.l1_loss(recon[..., 1:, :] - recon[..., :-1, :], images[..., 1:, :] - images[..., :-1, :])
    return dx + dy


def train(work: Path, out: Path, steps: int = STEPS) -> None:
    device = pick_device()
    vae = build_model().to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(vae.parameters(), lr=LR, weight_decay=0.0)
    ema = EMA(vae, decay=0.998)
    ckpt = work / "vae.safetensors"
    start = load_checkpoint(ckpt, {"vae": vae}, opt, ema) if ckpt.exists() else 0
    vae.train()
    for step in range(start, steps):
        _, images = sample_batch(batch_rng(SEED, step), BATCH)
        images = images.to(device, memory_format=torch.channels_last)
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
    report["latent_rgb"] = fit_latent_rgb(vae, device)
    write_preview_factors(report["latent_rgb"])
    (work / "vae_eval.json").write_text(json.dumps(report, indent=2))
    write_vae_card(out / "toy-vae", vae, steps, report)
    print(f"[vae] held-out {report}", flush=True)


def write_vae_card(folder: Path, vae, steps: int, report: dict, seconds: float | None = None) -> None:
    from .cards import hardware, write_card

    params = sum(p.numel() for p in vae.parameters())
    write_card(
        folder,
        "toy-vae",
        "An `AutoencoderKL` with Stable Diffusion's geometry: f = 8, 4 latent channels (64×64×3 → 8×8×4), "
        f"channels {'-'.join(map(str, vae.config.block_out_channels))}, one layer a block. "
        "`scaling_factor` measured on renders (1 / std of latents), as SD's 0.18215 was.",
        {
            "data": f"{steps:,} steps × {BATCH} fresh renders",
            "objective": f"L1 + MSE + gradient L1, KL weight {KL_WEIGHT:g}, AdamW {LR:g}, linear decay, EMA",
            "parameters": f"{params / 1e6:.2f} M",
            "hardware": hardware(),
            **({"time": f"{seconds:.0f} s"} if seconds else {}),
            "scaling_factor": vae.config.scaling_factor,
        },
        report,
    )


def psnr(recon: torch.Tensor, images: torch.Tensor) -> float:
    mse = F.mse_loss((recon.clamp(-1, 1) + 1) / 2, (images + 1) / 2).item()
    return float(10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-10))))


@torch.no_grad()
def measure_scaling_factor(vae, device, n: int = 512) -> float:
    _, images = sample_batch(batch_rng(SEED + 100, 0), n)
    latents = vae.encode(images.to(device)).latent_dist.sample()
    return round(1.0 / latents.std().item(), 5)


@torch.no_grad()
def fit_latent_rgb(vae, device, n: int = 512) -> list[list[float]]:
    """Least-squares (4, 3) map from scaled latents to the 8×8 box-averaged picture in [-1, 1]:
    the live preview's factors (as ComfyUI fits them for SD)."""
    _, images = sample_batch(batch_rng(SEED + 300, 0), n)
    latents = vae.encode(images.to(device)).latent_dist.mode() * vae.config.scaling_factor
    small = F.avg_pool2d(images.to(device), 8)
    x = latents.permute(0, 2, 3, 1).reshape(-1, 4)
    y = small.permute(0, 2, 3, 1).reshape(-1, 3)
    table = torch.linalg.lstsq(x.cpu(), y.cpu()).solution
    return [[round(v, 4) for v in row] for row in table.tolist()]


def write_preview_factors(factors: list[list[float]]) -> None:
    """Every toy model in the catalog shares the toy VAE, so its preview factors too."""
    from ...models import CATALOG_PATH

    catalog = json.loads(CATALOG_PATH.read_text())
    for entry in catalog.values():
        if entry["source"].startswith("assets/models/toy-") and entry["family"] == "sd":
            entry["latent_rgb"] = factors
    CATALOG_PATH.write_text(json.dumps(catalog, indent=2) + "\n")


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
