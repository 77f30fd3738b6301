"""Stage 3: toy-sd, a latent diffusion model that `StableDiffusionPipeline` loads.

Ho et al., "Denoising Diffusion Probabilistic Models" (2020), eq. 14: the UNet
predicts the noise ε added at timestep t, loss ||ε - ε_θ(√ᾱ_t z_0 + √(1-ᾱ_t) ε, t, c)||²,
here weighted by min-SNR-γ (Hang et al., "Efficient Diffusion Training via Min-SNR
Weighting Strategy", ICCV 2023, γ = 5). z_0 are the toy VAE's scaled latents, computed
once for a fixed set of renders; c is the toy CLIP text tower's last hidden state, the
tower fine-tuned beside the UNet. Captions are dropped to the empty caption with p = 0.1
so that classifier-free guidance (Ho & Salimans 2022) works at sampling time.

The UNet's cross-attention spreads almost evenly over the 32 caption tokens, so what it
reads is close to their mean state; toy CLIP's causal text tower, trained contrastively,
carries colour, shape and size into that mean but not a position word (left → right moved
it 0.025 of its norm, red → blue 0.31; `bench/bench_caption_reading.py`). A linear head on
the mean token state that must name the caption's position phrase (cross-entropy, weight
`POSITION_HEAD_WEIGHT`, an auxiliary task in the manner of Caruana, "Multitask Learning",
1997) makes the tower carry it; the head is dropped at export.

Two switches change the parameterisation, and every stage built on toy-sd (ip2p,
controlnet, ip_adapter) follows whatever schedule the toy-sd it loads was saved with:
`PREDICTION = "v_prediction"` trains v = √ᾱ_t ε − √(1−ᾱ_t) z_0 (Salimans & Ho 2022, §4),
whose loss weighs z_0 errors at high noise about 1/SNR times more than ε's does;
`ZERO_TERMINAL_SNR` rescales β so that ᾱ_T = 0 and samples from trailing timesteps
(Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed", 2024, §3.1–3.3).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from ..world import POSITIONS
from .common import (
    EMA,
    StepPlan,
    cosine_decay,
    images_to_tensor,
    load_checkpoint,
    log,
    pick_device,
    save_checkpoint,
    save_tokenizer,
    warmup_lr,
)

SEED = 3
STEPS = 8000
BATCH = 64
LR = 5e-4
TEXT_LR = 1e-4
DATASET = 40_000
CAPTION_DROPOUT = 0.1
MIN_SNR_GAMMA = 5.0
PREDICTION = "epsilon"  # or "v_prediction" (Salimans & Ho 2022, v = √ᾱ ε − √(1−ᾱ) z_0)
ZERO_TERMINAL_SNR = False  # Lin et al. 2024: rescale β so that ᾱ_T = 0, sample from trailing timesteps
POSITION_HEAD_WEIGHT = 0.1
POSITION_CLASSES = (None, *POSITIONS)


def position_class(caption: str) -> int:
    """The caption's position phrase as an index of POSITION_CLASSES (0: none, and every
    caption of more than one object)."""
    from ..captions import parse_caption

    spec = parse_caption(caption)
    return POSITION_CLASSES.index(spec.objects[0].position if len(spec.objects) == 1 else None)


def build_position_head(hidden_size: int) -> torch.nn.Linear:
    return torch.nn.Linear(hidden_size, len(POSITION_CLASSES))


def scheduler_config() -> dict:
    """Stable Diffusion's own noise schedule (scaled linear 0.00085 → 0.012, no clipping),
    optionally rescaled to zero terminal SNR."""
    config = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=PREDICTION,
    )
    if ZERO_TERMINAL_SNR:
        config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return config


def prediction_target(noise_scheduler, z0, noise, t) -> torch.Tensor:
    """What the denoiser learns to output: ε, or v for a v-prediction schedule."""
    if noise_scheduler.config.prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(z0, noise, t)
    return noise


def min_snr_weight(noise_scheduler, alphas, t, gamma: float = MIN_SNR_GAMMA) -> torch.Tensor:
    """Min-SNR-γ (Hang et al. 2023): the z_0-space weight min(SNR, γ), divided by what the
    target's loss already weighs z_0 errors with (SNR for ε, SNR + 1 for v). For v the z_0
    weight is min(SNR + 1, γ), so the zero-SNR step of a rescaled schedule still trains."""
    snr = alphas[t] / (1 - alphas[t])
    if noise_scheduler.config.prediction_type == "v_prediction":
        return torch.clamp(snr + 1, max=gamma) / (snr + 1)
    return torch.clamp(snr, max=gamma) / snr


def build_unet(cross_attention_dim: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
    )


@torch.no_grad()
def build_latent_dataset(vae, path: Path, device, n: int = DATASET, seed: int = SEED) -> dict:
    """Captions and latent distributions of `n` fixed renders drawn with `seed` (cached on disk)."""
    from safetensors.torch import load_file, save_file

    from ..captions import sample_pair
    from ..render import render

    if path.exists():
        data = load_file(str(path))
        return {
            "mean": data["mean"],
            "std": data["std"],
            "captions": json.loads(path.with_suffix(".json").read_text()),
        }
    rng = random.Random(seed)
    captions, means, stds = [], [], []
    for start in range(0, n, 256):
        pairs = [sample_pair(rng) for _ in range(min(256, n - start))]
        dist = vae.encode(images_to_tensor([render(s) for _, s in pairs]).to(device)).latent_dist
        captions += [c for c, _ in pairs]
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    data = {"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous()}
    save_file(data, str(path))
    path.with_suffix(".json").write_text(json.dumps(captions))
    return {**data, "captions": captions}


def loss_on_batch(
    unet,
    text_encoder,
    noise_scheduler,
    alphas,
    z0,
    ids,
    noise,
    t,
    image_latents=None,
    position_head=None,
    positions=None,
) -> torch.Tensor:
    """Min-SNR-γ weighted ε- (or v-) prediction loss of one batch; `alphas` = the scheduler's ᾱ on z0's device.

    `image_latents` (InstructPix2Pix) are concatenated to z_t on the channel axis. With a
    `position_head`, plus POSITION_HEAD_WEIGHT × its cross-entropy on the mean token state
    against `positions` (POSITION_CLASSES indices)."""
    zt = noise_scheduler.add_noise(z0, noise, t)
    context = text_encoder(ids).last_hidden_state
    if image_latents is not None:
        zt = torch.cat([zt, image_latents], dim=1)
    pred = unet(zt, t, encoder_hidden_states=context).sample
    target = prediction_target(noise_scheduler, z0, noise, t)
    weight = min_snr_weight(noise_scheduler, alphas, t)
    loss = (weight * ((pred - target) ** 2).mean(dim=(1, 2, 3))).mean()
    if position_head is not None:
        logits = position_head(context.mean(dim=1))
        loss = loss + POSITION_HEAD_WEIGHT * torch.nn.functional.cross_entropy(logits, positions)
    return loss


def train(work: Path, out: Path, steps: int = STEPS, budget: float | None = None) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    device = pick_device()
    # The tokenizer toy CLIP was trained with: build_tokenizer()'s BPE ids vary between processes.
    tokenizer = CLIPTokenizer.from_pretrained(out / "toy-clip")
    vae = AutoencoderKL.from_pretrained(out / "toy-vae", dtype=torch.float32).to(device).eval()
    text_encoder = CLIPTextModel.from_pretrained(out / "toy-clip", dtype=torch.float32).to(device)
    unet = build_unet(text_encoder.config.hidden_size).to(device)
    position_head = build_position_head(text_encoder.config.hidden_size).to(device)
    noise_scheduler = DDPMScheduler.from_config(scheduler_config())  # ignores DDIM-only keys
    data = build_latent_dataset(vae, work / "sd_latents.safetensors", device)
    ids_all = tokenizer(
        data["captions"], padding="max_length", truncation=True, return_tensors="pt"
    ).input_ids
    positions_all = torch.tensor([position_class(c) for c in data["captions"]])
    empty_ids = tokenizer([""], padding="max_length", return_tensors="pt").input_ids[0]
    scale = vae.config.scaling_factor
    alphas = noise_scheduler.alphas_cumprod.to(device)

    opt = torch.optim.AdamW(
        [
            {"params": [*unet.parameters(), *position_head.parameters()], "lr": LR},
            {"params": text_encoder.parameters(), "lr": TEXT_LR},
        ],
        weight_decay=0.01,
    )
    modules = {"unet": unet, "text_encoder": text_encoder, "position_head": position_head}
    ema = EMA(torch.nn.ModuleDict(modules), decay=0.999)
    ckpt = work / "sd.safetensors"
    start = load_checkpoint(ckpt, modules, opt, ema) if ckpt.exists() else 0
    unet.train()
    text_encoder.train()
    plan = StepPlan(steps, budget)
    for step in plan.run(start):
        g = torch.Generator().manual_seed(SEED * 1_000_003 + step)
        index = torch.randint(0, len(ids_all), (BATCH,), generator=g)
        z0 = (data["mean"][index] + data["std"][index] * torch.randn(BATCH, 4, 8, 8, generator=g)) * scale
        ids, positions = ids_all[index].clone(), positions_all[index]
        dropped = torch.rand(BATCH, generator=g) < CAPTION_DROPOUT
        ids[dropped], positions[dropped] = empty_ids, 0
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, 1000, (BATCH,), generator=g)
        z0, ids, positions = z0.to(device), ids.to(device), positions.to(device)
        noise, t = noise.to(device), t.to(device)
        decay = cosine_decay(step, plan.total)
        for group, base in zip(opt.param_groups, (LR, TEXT_LR), strict=True):
            group["lr"] = warmup_lr(step, base, 200) * decay
        loss = loss_on_batch(
            unet, text_encoder, noise_scheduler, alphas, z0, ids, noise, t, None, position_head, positions
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for m in modules.values() for p in m.parameters()], 1.0)
        opt.step()
        ema.update(torch.nn.ModuleDict(modules))
        if step % 50 == 0 or step == plan.total - 1:
            log("sd", step, plan.total, loss=loss.item())
        if (step + 1) % 250 == 0:
            save_checkpoint(ckpt, modules, opt, step + 1, ema)
    steps = plan.total
    save_checkpoint(ckpt, modules, opt, steps, ema)
    ema.copy_to(torch.nn.ModuleDict(modules))
    export(out, vae, text_encoder, tokenizer, unet)
    write_sd_card(out / "toy-sd", unet, steps)


def export(
    out: Path, vae, text_encoder, tokenizer, unet, pipeline_class=None, folder: str = "toy-sd", scheduler=None
) -> None:
    """Save a folder that `pipeline_class.from_pretrained` loads (weights in fp16); by default
    `StableDiffusionPipeline`, whose components InstructPix2Pix shares. `scheduler`: the base
    model's, for a model fine-tuned from it; by default this stage's own (`scheduler_config`)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = (pipeline_class or StableDiffusionPipeline)(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler or DDIMScheduler(**scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16).save_pretrained(out / folder, safe_serialization=True)
    save_tokenizer(tokenizer, out / folder / "tokenizer")  # vocab.json + merges.txt too


DEFAULT_GUIDANCE = 4.0


def write_sd_card(folder: Path, unet, steps: int, seconds: float | None = None) -> dict:
    """Score the exported folder on toy GenEval (guidance 1 and the default) and write its card."""
    from ..evaluate import geneval_for
    from .cards import hardware, write_card

    scores = {
        f"guidance {g:g}": geneval_for(str(folder), guidance=g, samples=4, scheduler="DDIM")
        for g in (1.0, DEFAULT_GUIDANCE)
    }
    scores = {k: {"overall": v["overall"], **v["per_category"]} for k, v in scores.items()}
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    channels = "-".join(str(c) for c in unet.config.block_out_channels)
    write_card(
        folder,
        "toy-sd",
        "A latent diffusion model that `StableDiffusionPipeline.from_pretrained` loads: "
        f"`UNet2DConditionModel` ({channels} channels, cross-attention at every level, {params:.1f} M "
        "parameters) on the toy VAE's 8×8×4 latents, the toy CLIP text tower fine-tuned beside it, DDIM. "
        "Weights in fp16.",
        {
            "data": f"{DATASET:,} fixed renders (latents precomputed with toy-vae), captions dropped to empty "
            f"with p = {CAPTION_DROPOUT}; held-out colour-shape-position combos never captioned",
            "objective": f"{'v' if PREDICTION == 'v_prediction' else 'ε'}-prediction, min-SNR-γ "
            f"(γ = {MIN_SNR_GAMMA:g}), AdamW {LR:g} (text tower {TEXT_LR:g}), 200-step warm-up, cosine decay, "
            "EMA 0.999, grad clip 1.0; beside it a linear head on the mean caption-token state names the "
            f"caption's position phrase (cross-entropy × {POSITION_HEAD_WEIGHT:g}; dropped at export)",
            "schedule": "SD's scaled linear β 0.00085 → 0.012"
            + (", rescaled to zero terminal SNR, trailing timesteps" if ZERO_TERMINAL_SNR else ""),
            "steps": f"{steps:,} × batch {BATCH}",
            "hardware": hardware(),
            **({"time": f"{seconds:.0f} s"} if seconds else {}),
            "defaults": f"DDIM, 25 steps, guidance {DEFAULT_GUIDANCE:g}",
        },
        {"toy GenEval, 25 steps, 4 samples a prompt": scores},
    )
    return scores
