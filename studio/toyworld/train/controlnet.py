"""Stage 6: toy ControlNets for toy-sd, one for Canny edges and one for segmentation maps.

Zhang, Rao & Agrawala, "Adding Conditional Control to Text-to-Image Diffusion Models"
(ICCV 2023). A trainable copy of the frozen UNet's encoder and middle block takes the
condition c_f (here through a small conv encoder from 64 × 64 pixels to the 8 × 8 latent,
§3.2) and feeds each of its blocks back into the UNet's skip connections through a zero
convolution Z (1 × 1 conv, weight and bias 0), eq. 2:

    y_c = F(x; Θ) + Z(F(x + Z(c; Θ_z1); Θ_c); Θ_z2)

At the start every Z outputs 0, so the model is exactly the base model; their gradients
are not 0 (∂Z/∂W is the input feature), so training moves them (§3.1, tested). The loss
is toy-sd's ε-prediction loss with the UNet and text tower frozen (eq. 3); half of the
captions are dropped to empty so that the model learns to read the map alone (§3.3).
The data are toy-sd's training renders (same scenes, same latents) with their Canny edges
(`render.canny_map`) or segmentation maps (`render.segmentation_map`), in [0, 1] as
diffusers' ControlNet pipelines feed them.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from ..captions import sample_pair
from ..render import CANNY_THRESHOLDS, canny_map, render, segmentation_map
from .common import EMA, StepPlan, cosine_decay, load_checkpoint, log, pick_device, save_checkpoint, warmup_lr
from .sd import SEED as SD_SEED
from .sd import build_latent_dataset, min_snr_weight, prediction_target

STEPS = 3000
BATCH = 32
LR = 1e-3
CAPTION_DROPOUT = 0.5
MIN_SNR_GAMMA = 5.0
CONDITIONING_CHANNELS = (16, 32, 64, 128)  # three stride-2 convs: 64 px → the 8 × 8 latent
KINDS = {"canny": "toy-sd-controlnet-canny", "seg": "toy-sd-controlnet-seg"}
MAP_NAMES = {
    "canny": "Canny maps (OpenCV, thresholds {}/{})".format(*CANNY_THRESHOLDS),
    "seg": "segmentation maps",
}


def control_map(kind: str, scene) -> np.ndarray:
    picture = canny_map(render(scene)) if kind == "canny" else segmentation_map(scene)
    return np.asarray(picture, dtype=np.uint8)


def build_controlnet(unet):
    """A ControlNet initialised from `unet`: encoder copied, zero convolutions at zero."""
    from diffusers import ControlNetModel

    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS)


def zero_convolutions(controlnet) -> list[torch.nn.Module]:
    """The Z of eq. 2: one per encoder block output, the middle block's, and the condition's."""
    return [
        *controlnet.controlnet_down_blocks,
        controlnet.controlnet_mid_block,
        controlnet.controlnet_cond_embedding.conv_out,
    ]


def build_maps(kind: str, n: int) -> torch.Tensor:
    """(n, 3, 64, 64) uint8 maps of toy-sd's n training scenes (regenerated from its seed)."""
    rng = random.Random(SD_SEED)
    maps = [control_map(kind, sample_pair(rng)[1]) for _ in range(n)]
    return torch.from_numpy(np.stack(maps)).permute(0, 3, 1, 2).contiguous()


def loss_on_batch(controlnet, unet, context, alphas, noise_scheduler, z0, cond, noise, t) -> torch.Tensor:
    zt = noise_scheduler.add_noise(z0, noise, t)
    down, mid = controlnet(zt, t, encoder_hidden_states=context, controlnet_cond=cond, return_dict=False)
    pred = unet(
        zt,
        t,
        encoder_hidden_states=context,
        down_block_additional_residuals=down,
        mid_block_additional_residual=mid,
    ).sample
    target = prediction_target(noise_scheduler, z0, noise, t)
    weight = min_snr_weight(noise_scheduler, alphas, t, MIN_SNR_GAMMA)
    return (weight * ((pred - target) ** 2).mean(dim=(1, 2, 3))).mean()


def train_kind(kind: str, work: Path, out: Path, steps: int = STEPS, budget: float | None = None) -> None:
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    started = time.time()
    device = pick_device()
    pipe = StableDiffusionPipeline.from_pretrained(out / "toy-sd", dtype=torch.float32).to(device)
    unet, text_encoder, tokenizer = pipe.unet.eval(), pipe.text_encoder.eval(), pipe.tokenizer
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    data = build_latent_dataset(pipe.vae, work / "sd_latents.safetensors", device)
    maps = build_maps(kind, len(data["captions"]))
    ids_all = tokenizer(
        data["captions"], padding="max_length", truncation=True, return_tensors="pt"
    ).input_ids
    empty_ids = tokenizer([""], padding="max_length", return_tensors="pt").input_ids[0]
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # toy-sd's own schedule
    alphas = noise_scheduler.alphas_cumprod.to(device)
    scale = pipe.vae.config.scaling_factor

    controlnet = build_controlnet(unet).to(device)
    opt = torch.optim.AdamW(controlnet.parameters(), lr=LR, weight_decay=0.01)
    ema = EMA(controlnet, decay=0.998)
    modules = {"controlnet": controlnet}
    ckpt = work / f"controlnet_{kind}.safetensors"
    clock = work / f"controlnet_{kind}_seconds.json"
    start = load_checkpoint(ckpt, modules, opt, ema) if ckpt.exists() else 0
    spent = json.loads(clock.read_text())["seconds"] if start and clock.exists() else 0.0
    controlnet.train()
    seed = {"canny": 61, "seg": 62}[kind]
    plan = StepPlan(steps, budget)
    for step in plan.run(start):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        index = torch.randint(0, len(ids_all), (BATCH,), generator=g)
        z0 = (data["mean"][index] + data["std"][index] * torch.randn(BATCH, 4, 8, 8, generator=g)) * scale
        ids = ids_all[index].clone()
        ids[torch.rand(BATCH, generator=g) < CAPTION_DROPOUT] = empty_ids
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, 1000, (BATCH,), generator=g)
        cond = maps[index].float() / 255.0
        with torch.no_grad():
            context = text_encoder(ids.to(device)).last_hidden_state
        for group in opt.param_groups:
            group["lr"] = warmup_lr(step, LR, 100) * cosine_decay(step, plan.total)
        loss = loss_on_batch(
            controlnet,
            unet,
            context,
            alphas,
            noise_scheduler,
            z0.to(device),
            cond.to(device),
            noise.to(device),
            t.to(device),
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        opt.step()
        ema.update(controlnet)
        if step % 50 == 0 or step == plan.total - 1:
            log(f"controlnet-{kind}", step, plan.total, loss=loss.item())
        if (step + 1) % 250 == 0:
            save_checkpoint(ckpt, modules, opt, step + 1, ema)
            clock.write_text(json.dumps({"seconds": spent + time.time() - started}))
    steps = plan.total
    save_checkpoint(ckpt, modules, opt, steps, ema)
    seconds = spent + time.time() - started
    clock.write_text(json.dumps({"seconds": seconds}))
    ema.copy_to(controlnet)
    export(out, kind, controlnet.eval(), steps, seconds)


def export(out: Path, kind: str, controlnet, steps: int, seconds: float, scenes: int = 50) -> None:
    """Save a folder that `ControlNetModel.from_pretrained` loads (fp16), scored on `scenes`
    held-out scenes (with the toy-sd of `out`), with its card."""
    from ...models import ModelManager
    from ..control_eval import controlnet_score
    from .cards import hardware, write_card

    folder = out / KINDS[kind]
    controlnet.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    score = controlnet_score(
        ModelManager(),
        str(out / "toy-sd"),
        str(folder),
        kind,
        n=scenes,
        steps=25,
        guidance=4.0,
        scheduler="DDIM",
    )
    params = sum(p.numel() for p in controlnet.parameters())
    write_card(
        folder,
        KINDS[kind],
        f"A ControlNet for toy-sd conditioned on {'Canny edge maps' if kind == 'canny' else 'segmentation maps'} "
        "of toy-world renders (zero convolutions, frozen toy-sd).",
        {
            "data": f"toy-sd's 40,000 training renders and their {MAP_NAMES[kind]}, {steps} steps × batch {BATCH}, "
            f"captions dropped with p = {CAPTION_DROPOUT}",
            "parameters": f"{params / 1e6:.2f} M",
            "hardware": hardware(),
            "time": f"{seconds:.0f} s",
        },
        {f"{scenes} held-out scenes, map + caption of the scene's colours (DDIM 25, guidance 4)": score},
    )


def train(work: Path, out: Path, steps: int = STEPS, budget: float | None = None) -> None:
    for kind in KINDS:
        if not (out / KINDS[kind] / "config.json").exists():
            train_kind(kind, work, out, steps, budget)
