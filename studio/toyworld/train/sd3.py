"""Stage 4: toy-sd3, an MM-DiT flow model that `StableDiffusion3Pipeline` loads.

Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis"
(ICML 2024): rectified flow, eq. 1 and §2-3, z_t = (1 - t) z_0 + t ε, the transformer
predicting the velocity v = ε - z_0, loss ||v - v_θ(z_t, t, c)||² with t drawn from the
logit-normal distribution (§3.1, m = 0, s = 1: "rf/lognorm(0.00, 1.00)"). This is the
convention of diffusers' `FlowMatchEulerDiscreteScheduler`: `scale_noise` forms
σ ε + (1 - σ) z_0, `step` moves x + (σ_next - σ) v_θ, and the transformer sees the
timestep σ · 1000.

z_0 are the toy VAE's latents with SD3's normalisation z = (z_raw - shift) · scale, both
factors measured on fresh renders and written into the exported VAE config. The text
condition c is exactly what `StableDiffusion3Pipeline.encode_prompt` computes with no T5
(`text_encoder_3=None`): the penultimate hidden states of two CLIP text towers (both
start as the toy CLIP text tower with its projection) concatenated on features, followed
by `max_sequence_length` (256) zero tokens, and the two pooled projections concatenated.
Captions are dropped to the empty caption with p = 0.1 for classifier-free guidance.

Training has three phases. In the first the towers are frozen, so c is computed once per
distinct caption by calling that very method. Toy CLIP, trained contrastively, barely
moves with a position word (`bench/bench_caption_reading.py`), so a transformer that
reads it frozen places shapes at random. In the second phase (`text_tuning`) both towers
are trained beside the transformer, with toy-sd's auxiliary position head on the mean of
c's CLIP tokens (`sd.build_position_head`, cross-entropy × `sd.POSITION_HEAD_WEIGHT`;
dropped at export), as toy-sd trains its one tower. The third (`composite_tuning`) is
the second again at a lower rate, with the captions of two or more objects (pairs,
relations, counts) drawn COMPOSITE_WEIGHT times as often: after phase 2 those are the
categories the model fails (toy GenEval two objects 0.375, relation 0.146, counting
0.438, single object 0.979); 12,020 steps of it gave 0.521, 0.229, 0.625 and 0.979
(overall 0.611 → 0.705). `tune_shipped` runs this phase alone on an exported model.

The 256 zero tokens are identical and stay identical through every joint block (each
token is only normalised, modulated, attended from and passed through MLPs on its own),
so training keeps one of them and adds log 256 to its attention logit: softmax over 256
copies of a key equals one key whose weight is multiplied by 256. The result is the
full-length computation (checked in tests/test_training_smoke.py) at a fraction of its
cost; the exported model uses diffusers' standard attention processor.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .common import (
    EMA,
    StepPlan,
    batch_rng,
    cosine_decay,
    load_checkpoint,
    log,
    pick_device,
    sample_batch,
    save_checkpoint,
    save_tokenizer,
    warmup_lr,
)

SEED = 4
STEPS = 4500  # ≈ 0.6 s a step at batch 64 on 2 CPU cores: ~45 min + ~4 min of latents
BATCH = 64
DATASET = 40_000  # fixed renders whose latent distributions are precomputed
LR = 5e-4
WARMUP = 200
CAPTION_DROPOUT = 0.1
LOGIT_MEAN, LOGIT_STD = 0.0, 1.0
# The pipeline's default `max_sequence_length`: the number of T5 (here zero) tokens.
T5_TOKENS = 256
# Phase 2 (`text_tuning`): ≈ 0.63 s a step at batch 64 on 2 CPU cores, ~47 min.
TEXT_STEPS = 4500
TUNE_LR = 2e-4
TEXT_LR = 1e-4
TUNE_WARMUP = 100
TUNE_EMA = 0.998
# Phase 3 (`composite_tuning`): the same tuning with the captions of two or more objects
# (pairs, relations, counts) drawn COMPOSITE_WEIGHT times as often as single-object ones;
# ≈ 0.58 s a step at batch 64 on 2 CPU cores, ~116 min.
COMPOSE_STEPS = 12_020
COMPOSE_LR = 1.5e-4
COMPOSE_TEXT_LR = 5e-5
COMPOSITE_WEIGHT = 3.0
# Inference-time timestep shift (σ → shift·σ / (1 + (shift - 1)·σ)). SD3 uses 3.0 at
# 1024² (4,096 latent patches), where neighbouring pixels share so much signal that more
# noise is needed to wipe it out (paper §5.3.2, shift ∝ √(resolution)). An 8 × 8 latent of
# flat shapes has no such redundancy: sampling at the logit-normal's own times is right.
SHIFT = 1.0


def build_transformer(joint_attention_dim: int = 256, pooled_projection_dim: int = 256):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=6,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=joint_attention_dim,
        caption_projection_dim=128,  # = heads × head dim
        pooled_projection_dim=pooled_projection_dim,
        pos_embed_max_size=64,  # latents up to 64 × 64 (512 px images)
        qk_norm="rms_norm",  # as SD3.5: keeps the attention logits tame in training
    )


def build_optimizer(transformer) -> torch.optim.Optimizer:
    return torch.optim.AdamW(transformer.parameters(), lr=LR, weight_decay=0.01)


@dataclass(frozen=True)
class Tuning:
    """A phase that trains both towers beside the transformer, with the position head."""

    name: str
    steps: int
    lr: float  # the transformer's and the head's
    text_lr: float  # the towers'
    seed: int  # its batches are drawn from seed * 1_000_003 + step
    checkpoint: str  # file in the work folder it resumes from
    composite_weight: float = 1.0  # how much more often captions of 2+ objects are drawn


def text_tuning() -> Tuning:
    """Phase 2 (read at call time: the CLI's --text-steps sets TEXT_STEPS)."""
    return Tuning("sd3 text", TEXT_STEPS, TUNE_LR, TEXT_LR, SEED + 1, "sd3_text.safetensors")


def composite_tuning(steps: int = COMPOSE_STEPS) -> Tuning:
    """Phase 3: phase 2 again, with pairs, relations and counts drawn COMPOSITE_WEIGHT× as often."""
    return Tuning(
        "sd3 compose",
        steps,
        COMPOSE_LR,
        COMPOSE_TEXT_LR,
        SEED + 2,
        "sd3_compose.safetensors",
        COMPOSITE_WEIGHT,
    )


def build_tuning_optimizer(
    transformer, towers, position_head, phase: Tuning | None = None
) -> torch.optim.Optimizer:
    """A tuning phase's: the transformer and the head at phase.lr, the towers at phase.text_lr."""
    phase = phase or text_tuning()
    return torch.optim.AdamW(
        [
            {"params": [*transformer.parameters(), *position_head.parameters()], "lr": phase.lr},
            {"params": [p for tower in towers for p in tower.parameters()], "lr": phase.text_lr},
        ],
        weight_decay=0.01,
    )


# --------------------------------------------------------------------------- attention


class CollapsedPaddingProcessor:
    """`JointAttnProcessor2_0` in which the context's last token stands for `copies`
    identical tokens (the T5 zeros): log(copies) is added to its attention logit."""

    def __init__(self, copies: int):
        self.log_copies = math.log(copies)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        batch, heads = hidden_states.shape[0], attn.heads

        def split(x):
            return x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        query, key, value = (
            split(attn.to_q(hidden_states)),
            split(attn.to_k(hidden_states)),
            split(attn.to_v(hidden_states)),
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        bias = None
        if encoder_hidden_states is not None:
            c_query = split(attn.add_q_proj(encoder_hidden_states))
            c_key = split(attn.add_k_proj(encoder_hidden_states))
            c_value = split(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                c_query = attn.norm_added_q(c_query)
            if attn.norm_added_k is not None:
                c_key = attn.norm_added_k(c_key)
            query = torch.cat([query, c_query], dim=2)
            key = torch.cat([key, c_key], dim=2)
            value = torch.cat([value, c_value], dim=2)
            bias = torch.zeros(1, 1, 1, key.shape[2], dtype=query.dtype, device=query.device)
            bias[..., -1] = self.log_copies
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=bias, dropout_p=0.0, is_causal=False
        )
        out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[3]).to(query.dtype)
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](out))
        out, context = out[:, : hidden_states.shape[1]], out[:, hidden_states.shape[1] :]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return attn.to_out[1](attn.to_out[0](out)), context


def collapse_padding(transformer, copies: int = T5_TOKENS) -> None:
    """Train on [CLIP tokens, one zero token] as if it were [CLIP tokens, `copies` zeros]."""
    transformer.set_attn_processor(CollapsedPaddingProcessor(copies))


def restore_attention(transformer) -> None:
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    transformer.set_attn_processor(JointAttnProcessor2_0())


def with_padding_token(clip_context: torch.Tensor) -> torch.Tensor:
    return torch.cat(
        [clip_context, clip_context.new_zeros(clip_context.shape[0], 1, clip_context.shape[2])], 1
    )


def clip_context(towers, ids) -> tuple[torch.Tensor, torch.Tensor]:
    """`encode_prompt`'s CLIP part with gradients: the towers' penultimate hidden states
    concatenated on features (B, 32, dim), and their pooled projections (B, dim)."""
    states, pooled = [], []
    for tower in towers:
        out = tower(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled.append(out.text_embeds)
    return torch.cat(states, -1), torch.cat(pooled, -1)


def text_tuning_loss(transformer, towers, position_head, z0, ids, noise, t, positions) -> torch.Tensor:
    """The tuning phases' loss: the rectified-flow loss through the trainable towers, plus
    POSITION_HEAD_WEIGHT × the position head's cross-entropy on the mean CLIP token state."""
    from .sd import POSITION_HEAD_WEIGHT

    context, pooled = clip_context(towers, ids)
    loss = loss_on_batch(transformer, z0, context, pooled, noise, t)
    logits = position_head(context.mean(dim=1))
    return loss + POSITION_HEAD_WEIGHT * F.cross_entropy(logits, positions)


def loss_on_batch(transformer, z0, clip_context, pooled, noise, t) -> torch.Tensor:
    """Rectified-flow loss; `transformer` must have had `collapse_padding` applied.

    z0, noise: (B, 4, 8, 8); clip_context: (B, 32, joint dim) — the CLIP part of the
    pipeline's prompt embeddings; pooled: (B, pooled dim); t ∈ (0, 1): (B,).
    """
    t_ = t.view(-1, 1, 1, 1)
    zt = (1 - t_) * z0 + t_ * noise
    target = noise - z0
    pred = transformer(
        hidden_states=zt,
        timestep=t * 1000,
        encoder_hidden_states=with_padding_token(clip_context),
        pooled_projections=pooled,
    ).sample
    return F.mse_loss(pred, target)


# --------------------------------------------------------------------------- data


def draw_batch(g: torch.Generator, data: dict, latent_factors: tuple[float, float], weights=None):
    """One step's draws from `g`, in a fixed order: BATCH render indices (uniform, or in
    proportion to `weights`, one per render), their latents z_0 (sampled from the stored
    posteriors, SD3-normalised), which captions are dropped, the noise ε and the
    logit-normal times t."""
    shift, scale = latent_factors
    if weights is None:
        index = torch.randint(0, len(data["captions"]), (BATCH,), generator=g)
    else:
        index = torch.multinomial(weights, BATCH, replacement=True, generator=g)
    z0 = (data["mean"][index] + data["std"][index] * torch.randn(BATCH, 4, 8, 8, generator=g) - shift) * scale
    dropped = torch.rand(BATCH, generator=g) < CAPTION_DROPOUT
    noise = torch.randn(z0.shape, generator=g)
    t = torch.sigmoid(torch.randn(BATCH, generator=g) * LOGIT_STD + LOGIT_MEAN)
    return index, z0, dropped, noise, t


def composite_weights(captions: list[str], weight: float) -> torch.Tensor:
    """Each render's drawing weight: `weight` for a caption of two or more objects, else 1."""
    from ..captions import parse_caption

    return torch.tensor([weight if len(parse_caption(c).objects) > 1 else 1.0 for c in captions])


@torch.no_grad()
def measure_latent_factors(vae, device, n: int = 512) -> tuple[float, float]:
    """SD3's (shift_factor, scaling_factor): the latents' mean, and 1 / their std after shifting."""
    _, images = sample_batch(batch_rng(SEED + 100, 0), n)
    g = torch.Generator(device).manual_seed(SEED)
    latents = vae.encode(images.to(device)).latent_dist.sample(generator=g)
    shift = latents.mean().item()
    return round(shift, 5), round(1.0 / (latents - shift).std().item(), 5)


@torch.no_grad()
def encode_captions(pipe, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """`pipe.encode_prompt` of each caption: the CLIP tokens (B, 32, dim) and pooled (B, dim).

    The remaining T5_TOKENS positions of the pipeline's embeddings are zeros (checked)."""
    n_clip = pipe.tokenizer_max_length
    contexts, pooled = [], []
    for start in range(0, len(captions), 256):
        chunk = captions[start : start + 256]
        embeds, _, pool, _ = pipe.encode_prompt(
            prompt=chunk,
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=T5_TOKENS,
        )
        assert embeds.shape[1] == n_clip + T5_TOKENS and not embeds[:, n_clip:].any()
        contexts.append(embeds[:, :n_clip].float().cpu())
        pooled.append(pool.float().cpu())
    return torch.cat(contexts), torch.cat(pooled)


def build_pipeline(transformer, vae, text_encoder, text_encoder_2, tokenizer):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )


# --------------------------------------------------------------------------- training


def train(work: Path, out: Path, steps: int = STEPS, budget: float | None = None) -> None:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    from .sd import build_latent_dataset

    started = time.time()
    device = pick_device()
    # The tokenizer toy CLIP was trained with (build_tokenizer's ids vary between processes).
    tokenizer = CLIPTokenizer.from_pretrained(out / "toy-clip")
    vae = AutoencoderKL.from_pretrained(out / "toy-vae", dtype=torch.float32).to(device).eval()
    towers = [
        CLIPTextModelWithProjection.from_pretrained(out / "toy-clip", dtype=torch.float32)
        .to(device)
        .eval()
        .requires_grad_(False)
        for _ in range(2)
    ]
    shift, scale = measure_latent_factors(vae, device)
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    transformer = build_transformer(
        joint_attention_dim=sum(t.config.hidden_size for t in towers),
        pooled_projection_dim=sum(t.config.projection_dim for t in towers),
    ).to(device)
    pipe = build_pipeline(transformer, vae, towers[0], towers[1], tokenizer)

    data = build_latent_dataset(vae, work / "sd3_latents.safetensors", device, n=DATASET)
    distinct = sorted(set(data["captions"])) + [""]
    row = {c: i for i, c in enumerate(distinct)}
    caption_rows = torch.tensor([row[c] for c in data["captions"]])
    contexts, pooled_all = encode_captions(pipe, distinct, device)
    contexts, pooled_all = contexts.to(device), pooled_all.to(device)
    empty = row[""]

    opt = build_optimizer(transformer)
    ema = EMA(transformer, decay=0.999)
    modules = {"transformer": transformer}
    ckpt = work / "sd3.safetensors"
    clock = work / "sd3_seconds.json"
    start = load_checkpoint(ckpt, modules, opt, ema) if ckpt.exists() else 0
    spent = json.loads(clock.read_text())["seconds"] if start and clock.exists() else 0.0
    collapse_padding(transformer)
    transformer.train()
    tick, ticked = time.time(), 0
    plan = StepPlan(start if (work / "sd3_text.safetensors").exists() else steps, budget)
    for step in plan.run(start):
        g = torch.Generator().manual_seed(SEED * 1_000_003 + step)
        index, z0, dropped, noise, t = draw_batch(g, data, (shift, scale))
        rows = caption_rows[index].clone()
        rows[dropped] = empty
        rows = rows.to(device)
        decay = cosine_decay(step, plan.total)
        for group in opt.param_groups:
            group["lr"] = warmup_lr(step, LR, WARMUP) * decay
        loss = loss_on_batch(
            transformer, z0.to(device), contexts[rows], pooled_all[rows], noise.to(device), t.to(device)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        ema.update(transformer)
        ticked += 1
        if step % 50 == 0 or step == plan.total - 1:
            log("sd3", step, plan.total, loss=loss.item(), s_per_step=(time.time() - tick) / ticked)
            tick, ticked = time.time(), 0
        if (step + 1) % 250 == 0:
            save_checkpoint(ckpt, modules, opt, step + 1, ema)
            clock.write_text(json.dumps({"seconds": spent + time.time() - started}))
    steps = plan.total
    save_checkpoint(ckpt, modules, opt, steps, ema)
    clock.write_text(json.dumps({"seconds": spent + time.time() - started}))
    ema.copy_to(transformer)
    tune(work, text_tuning(), transformer, towers, tokenizer, data, (shift, scale), device, clock)
    tune(work, composite_tuning(), transformer, towers, tokenizer, data, (shift, scale), device, clock)
    seconds = json.loads(clock.read_text())["seconds"]
    restore_attention(transformer)
    transformer.eval()
    facts = {
        "data": f"{len(caption_rows)} fixed renders ({len(distinct) - 1} distinct captions), "
        f"{steps} steps × batch {BATCH}, captions dropped with p = {CAPTION_DROPOUT}",
        "objective": "rectified flow, v = ε - z_0, logit-normal(0, 1) timesteps, EMA 0.999",
        "text": "two copies of the toy CLIP text tower (penultimate layer, pooled projection), no T5: "
        f"frozen for those steps, then {TEXT_STEPS} steps × batch {BATCH} tuned beside the transformer "
        f"with toy-sd's position head (AdamW {TUNE_LR:g}, towers {TEXT_LR:g}, EMA {TUNE_EMA}), then "
        f"{COMPOSE_STEPS} steps more with captions of 2+ objects drawn {COMPOSITE_WEIGHT:g}× as often "
        f"(AdamW {COMPOSE_LR:g}, towers {COMPOSE_TEXT_LR:g}, a fresh head)",
        "latents": f"toy-vae, shift_factor {shift}, scaling_factor {scale}",
        "scheduler": f"FlowMatchEulerDiscreteScheduler(shift={SHIFT})",
    }
    export(out, pipe, facts, seconds)


def tune(
    work: Path,
    phase: Tuning,
    transformer,
    towers,
    tokenizer,
    data,
    latent_factors,
    device,
    clock: Path,
    budget: float | None = None,
) -> None:
    """A tuning phase: phase.steps steps (or as many as fit in `budget` seconds) training both
    towers beside the transformer with a fresh position head; resumable from
    `work`/phase.checkpoint. Adds its seconds to `clock`."""
    from .sd import build_position_head, position_class

    started = time.time()
    captions = data["captions"]
    encode = dict(
        padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    ids_all = tokenizer(captions, **encode).input_ids
    positions_all = torch.tensor([position_class(c) for c in captions])
    weights = composite_weights(captions, phase.composite_weight) if phase.composite_weight != 1 else None
    empty_ids = tokenizer([""], **encode).input_ids[0]
    head = build_position_head(sum(t.config.hidden_size for t in towers)).to(device)
    for tower in towers:
        tower.requires_grad_(True).train()
    opt = build_tuning_optimizer(transformer, towers, head, phase)
    modules = {
        "transformer": transformer,
        "text_encoder": towers[0],
        "text_encoder_2": towers[1],
        "head": head,
    }
    ema = EMA(torch.nn.ModuleDict(modules), decay=TUNE_EMA)
    ckpt = work / phase.checkpoint
    start = load_checkpoint(ckpt, modules, opt, ema) if ckpt.exists() else 0
    spent = json.loads(clock.read_text())["seconds"] if clock.exists() else 0.0
    transformer.train()
    plan = StepPlan(phase.steps, budget)
    tick, ticked = time.time(), 0
    for step in plan.run(start):
        g = torch.Generator().manual_seed(phase.seed * 1_000_003 + step)
        index, z0, dropped, noise, t = draw_batch(g, data, latent_factors, weights)
        ids, positions = ids_all[index].clone(), positions_all[index].clone()
        ids[dropped], positions[dropped] = empty_ids, 0
        decay = cosine_decay(step, plan.total)
        for group, base in zip(opt.param_groups, (phase.lr, phase.text_lr), strict=True):
            group["lr"] = warmup_lr(step, base, TUNE_WARMUP) * decay
        batch = (z0, ids, noise, t, positions)
        loss = text_tuning_loss(transformer, towers, head, *(x.to(device) for x in batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for m in modules.values() for p in m.parameters()], 1.0)
        opt.step()
        ema.update(torch.nn.ModuleDict(modules))
        ticked += 1
        if step % 50 == 0 or step == plan.total - 1:
            log(phase.name, step, plan.total, loss=loss.item(), s_per_step=(time.time() - tick) / ticked)
            tick, ticked = time.time(), 0
        if (step + 1) % 250 == 0:
            save_checkpoint(ckpt, modules, opt, step + 1, ema)
            clock.write_text(json.dumps({"seconds": spent + time.time() - started}))
    save_checkpoint(ckpt, modules, opt, plan.total, ema)
    clock.write_text(json.dumps({"seconds": spent + time.time() - started}))
    ema.copy_to(torch.nn.ModuleDict(modules))
    for tower in towers:
        tower.requires_grad_(False).eval()


def tune_shipped(work: Path, out: Path, steps: int = COMPOSE_STEPS, budget: float | None = None) -> None:
    """Phase 3 alone, on the toy-sd3 already in `out` (how the shipped weights got theirs):
    loads its transformer and towers, tunes them and writes those three back in fp16."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    from .sd import build_latent_dataset

    folder, device = out / "toy-sd3", pick_device()
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    vae = AutoencoderKL.from_pretrained(folder / "vae", dtype=torch.float32).to(device).eval()
    transformer = SD3Transformer2DModel.from_pretrained(folder / "transformer", dtype=torch.float32).to(
        device
    )
    towers = [
        CLIPTextModelWithProjection.from_pretrained(folder / name, dtype=torch.float32).to(device)
        for name in ("text_encoder", "text_encoder_2")
    ]
    data = build_latent_dataset(vae, work / "sd3_latents.safetensors", device, n=DATASET)
    factors = (vae.config.shift_factor, vae.config.scaling_factor)
    collapse_padding(transformer)
    tune(
        work,
        composite_tuning(steps),
        transformer,
        towers,
        tokenizer,
        data,
        factors,
        device,
        work / "sd3_compose_seconds.json",
        budget,
    )
    restore_attention(transformer)
    transformer.eval()
    transformer.to(torch.float16).save_pretrained(folder / "transformer", safe_serialization=True)
    for name, tower in zip(("text_encoder", "text_encoder_2"), towers, strict=True):
        tower.to(torch.float16).save_pretrained(folder / name, safe_serialization=True)
    config_file = folder / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config.pop("_name_or_path", None)  # the local path it was loaded from
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export(out: Path, pipe, facts: dict, seconds: float | None = None) -> None:
    """Save a folder that `StableDiffusion3Pipeline.from_pretrained` loads (weights in fp16)."""
    from .cards import hardware, write_card

    folder = out / "toy-sd3"
    params = sum(p.numel() for p in pipe.transformer.parameters())
    pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):  # vocab.json + merges.txt too, as toy-clip ships them
        save_tokenizer(getattr(pipe, name), folder / name)
    config = pipe.transformer.config
    write_card(
        folder,
        "toy-sd3",
        "A Stable Diffusion 3 style MM-DiT (joint text-image attention) trained with rectified flow "
        "on toy-world renders, in the toy VAE's latent space, conditioned on two toy CLIP text towers.",
        {
            **facts,
            "transformer": f"{config.num_layers} joint blocks, {config.num_attention_heads} heads × "
            f"{config.attention_head_dim}, patch {config.patch_size}, {params / 1e6:.2f} M parameters",
            "hardware": hardware(),
            **({"time": f"{seconds:.0f} s"} if seconds else {}),
        },
        {},
    )
