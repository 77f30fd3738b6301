"""Stage 7: the toy IP-Adapter for toy-sd (and its concatenated-attention ablation).

Ye et al., "IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image Diffusion
Models" (2023). A frozen image encoder (toy CLIP's vision tower) embeds the reference; a
small projection turns its embedding c_i into 4 image tokens (Linear + LayerNorm, §3.2.1);
every cross-attention layer of the frozen UNet gets its own new key and value projections
W'_k, W'_v for those tokens, and adds a second attention to the text one (eq. 5, decoupled
cross-attention):

    Z_new = Softmax(Q K^T / √d) V + λ · Softmax(Q K'^T / √d) V',   K' = c_i W'_k, V' = c_i W'_v

W'_k starts as a copy of the layer's W_k (§3.2.2) and W'_v at zero, so that the adapted UNet
starts as the base model exactly: with W'_v = W_v too, the second attention doubles the
layer's output, and toy-sd draws empty backgrounds (measured on 40 held-out cases before
training: 20 pictures without a shape, against 5 for toy-sd alone). The projection
starts as a least-squares map from the image embedding to the text tower's states of
"a COLOUR SHAPE" (the tokens a, colour, shape, end), so the image tokens begin where the
words are. Only the projection and the new W'_k, W'_v train (base weights frozen), on the
ε-prediction loss (eq. 6) — min-SNR weighted, and at high noise boosted by 1/SNR (up to
HIGH_NOISE_WEIGHT): a reference's colour and shape decide the first sampling steps, where
plain ε-loss is tiny — with the image embedding dropped to zeros, the caption to empty, or
both, each with p = 0.05 — zeros being what diffusers feeds the unconditional branch of
guidance.

Data: single-shape scenes; the reference of a scene is a fresh render of the same shape
and colour at another place, size and background (never the target itself), so that the
adapter carries what the object is while the caption ("a shape on the left") says where.
The target latents (toy-vae) and the reference embeddings are computed once.

The ablation (`concatenated=True`, `python -m studio.toyworld.train ip_adapter --ablation`)
is the same training with the same parameters, but the image tokens join the text tokens
in ONE softmax: Softmax(Q [K; K']^T / √d) [V; V'] — the "simple adapter" the paper compares
against. It is written to the work folder (not shipped) for `bench/bench_ip_adapter.py`.

The shipped folder loads with diffusers alone:
`pipe.load_ip_adapter("assets/models/toy-ip-adapter", subfolder="", weight_name=WEIGHT_NAME)`
(image encoder in its `image_encoder/` folder).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..captions import CaptionSpec, ObjectSpec, format_caption, sample_scene
from ..render import render
from ..world import BACKGROUNDS, COLOR_SHAPES, POSITIONS
from .common import (
    EMA,
    StepPlan,
    cosine_decay,
    images_to_tensor,
    load_checkpoint,
    log,
    pick_device,
    save_checkpoint,
    warmup_lr,
)
from .sd import MIN_SNR_GAMMA, min_snr_weight, prediction_target

FOLDER = "toy-ip-adapter"
WEIGHT_NAME = "ip-adapter_toy-sd.safetensors"
SEED = 71
STEPS = 3000
BATCH = 32
LR = 1e-3
DATASET = 8000
NUM_TOKENS = 4  # the plain IP-Adapter's image tokens (what load_ip_adapter builds for `proj.weight`)
DROP = 0.05  # image, caption, and both: each dropped with this probability
HIGH_NOISE_WEIGHT = 10.0  # cap of the 1/SNR boost of the loss at high noise


# --------------------------------------------------------------------------- data


def target_scene(rng: random.Random):
    """A single-shape scene: random colour, shape, size word, position (or none), background."""
    color, shape = rng.choice(COLOR_SHAPES)
    obj = ObjectSpec(color, shape, rng.choice(("small", "large", None)), rng.choice(POSITIONS + (None,)))
    return obj, sample_scene(CaptionSpec((obj,), background=rng.choice(list(BACKGROUNDS))), rng)


def reference_scene(color: str, shape: str, rng: random.Random):
    """A fresh render of that shape and colour, anywhere, any size, any background."""
    spec = CaptionSpec((ObjectSpec(color, shape),), background=rng.choice(list(BACKGROUNDS)))
    return sample_scene(spec, rng)


def caption_for(obj: ObjectSpec, background: str, rng: random.Random) -> str:
    """The caption a training step uses: mostly generic ("a shape on the left"), sometimes full."""
    r = rng.random()
    if r < 0.5:
        spec = CaptionSpec((ObjectSpec(position=obj.position),))
    elif r < 0.7:
        spec = CaptionSpec((ObjectSpec(position=obj.position),), background=background)
    elif r < 0.9:
        spec = CaptionSpec((obj,), background=background if rng.random() < 0.5 else None)
    else:
        spec = CaptionSpec((ObjectSpec(),))
    return format_caption(spec)


def load_image_encoder(folder: Path, device):
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    encoder = CLIPVisionModelWithProjection.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    return encoder, CLIPImageProcessor.from_pretrained(folder)


@torch.no_grad()
def embed_images(encoder, processor, images, device) -> torch.Tensor:
    """CLIP image embeddings exactly as diffusers' `encode_image` makes them."""
    out = []
    for start in range(0, len(images), 256):
        pixels = processor(images[start : start + 256], return_tensors="pt").pixel_values.to(device)
        out.append(encoder(pixels).image_embeds.cpu())
    return torch.cat(out)


@torch.no_grad()
def build_dataset(vae, encoder, processor, path: Path, device, n: int = DATASET) -> dict:
    """Targets (latent mean/std, their objects) and two references per target (embeddings),
    cached on disk."""
    from safetensors.torch import load_file, save_file

    if path.exists():
        data = load_file(str(path))
        return {**data, "meta": json.loads(path.with_suffix(".json").read_text())}
    rng = random.Random(SEED)
    meta, means, stds, refs = [], [], [], []
    for start in range(0, n, 256):
        batch = []
        for _ in range(min(256, n - start)):
            obj, scene = target_scene(rng)
            shape = scene.shapes[0]
            references = [render(reference_scene(shape.color, shape.kind, rng)) for _ in range(2)]
            batch.append((obj, scene, references))
            meta.append(
                {
                    "color": shape.color,
                    "shape": shape.kind,
                    "size": obj.size,
                    "position": obj.position,
                    "background": scene.background,
                }
            )
        dist = vae.encode(images_to_tensor([render(s) for _, s, _ in batch]).to(device)).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
        pictures = [r for _, _, rs in batch for r in rs]
        refs.append(embed_images(encoder, processor, pictures, device).view(len(batch), 2, -1))
    data = {
        "mean": torch.cat(means).contiguous(),
        "std": torch.cat(stds).contiguous(),
        "references": torch.cat(refs).contiguous(),
    }
    save_file(data, str(path))
    path.with_suffix(".json").write_text(json.dumps(meta))
    return {**data, "meta": meta}


# --------------------------------------------------------------------------- the adapter


def concatenated_processor_class():
    """The ablation's processor: image tokens join the text tokens in one softmax."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    class ConcatenatedIPAttnProcessor(IPAdapterAttnProcessor2_0):
        """Softmax(Q [K; K']^T / √d) [V; V']: the same weights as the decoupled processor
        (so `set_ip_adapter_scale` and the file layout are unchanged); the scale multiplies V'."""

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
            text, image_tokens = encoder_hidden_states
            batch = hidden_states.shape[0]
            query = attn.to_q(hidden_states)
            keys = [attn.to_k(text)]
            values = [attn.to_v(text)]
            for tokens, scale, to_k_ip, to_v_ip in zip(
                image_tokens, self.scale, self.to_k_ip, self.to_v_ip, strict=True
            ):
                tokens = tokens.reshape(batch, -1, tokens.shape[-1])
                keys.append(to_k_ip(tokens))
                values.append(scale * to_v_ip(tokens))
            key, value = torch.cat(keys, 1), torch.cat(values, 1)
            head = key.shape[-1] // attn.heads

            def split(x):
                return x.view(batch, -1, attn.heads, head).transpose(1, 2)

            out = F.scaled_dot_product_attention(split(query), split(key), split(value))
            out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head).to(query.dtype)
            return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor

    return ConcatenatedIPAttnProcessor


def cross_attention_layers(unet) -> list[str]:
    """The attn2 processor names in `unet.attn_processors` order (load_ip_adapter's key order)."""
    return [name for name in unet.attn_processors if not name.endswith("attn1.processor")]


def hidden_size(unet, name: str) -> int:
    channels = unet.config.block_out_channels
    if name.startswith("mid_block"):
        return channels[-1]
    block = int(name.split(".")[1])
    return list(reversed(channels))[block] if name.startswith("up_blocks") else channels[block]


def attach(unet, image_embed_dim: int, *, concatenated: bool = False) -> torch.nn.ModuleDict:
    """New IP-Adapter modules on `unet` (W'_k copied from W_k, W'_v zero); returns them as one
    ModuleDict {"image_proj": ..., "layers": [processors]} to train and save."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection

    cls = concatenated_processor_class() if concatenated else IPAdapterAttnProcessor2_0
    cross = unet.config.cross_attention_dim
    processors, layers = dict(unet.attn_processors), []
    modules = dict(unet.named_modules())
    for name in cross_attention_layers(unet):
        proc = cls(hidden_size=hidden_size(unet, name), cross_attention_dim=cross, num_tokens=(NUM_TOKENS,))
        attn = modules[name.removesuffix(".processor")]
        with torch.no_grad():
            proc.to_k_ip[0].weight.copy_(attn.to_k.weight)
            proc.to_v_ip[0].weight.zero_()  # the adapted UNet starts as the base model exactly
        processors[name] = proc
        layers.append(proc)
    unet.set_attn_processor(processors)
    projection = ImageProjection(
        image_embed_dim=image_embed_dim, cross_attention_dim=cross, num_image_text_embeds=NUM_TOKENS
    )
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([projection])
    unet.config.encoder_hid_dim_type = "ip_image_proj"
    return torch.nn.ModuleDict({"image_proj": projection, "layers": torch.nn.ModuleList(layers)})


def adapter_state_dict(adapter: torch.nn.ModuleDict) -> dict[str, torch.Tensor]:
    """The file layout `load_ip_adapter` reads: image_proj.{proj,norm}.*, ip_adapter.{1,3,5,...}.to_{k,v}_ip.weight."""
    tensors = {}
    for k, v in adapter["image_proj"].state_dict().items():
        tensors["image_proj." + k.replace("image_embeds", "proj")] = v
    for i, layer in enumerate(adapter["layers"]):
        tensors[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = layer.to_k_ip[0].weight
        tensors[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = layer.to_v_ip[0].weight
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def use_concatenated_attention(unet) -> None:
    """Turn the IP-Adapter processors diffusers installed into the ablation's (same weights)."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    cls = concatenated_processor_class()
    processors = dict(unet.attn_processors)
    for name, proc in processors.items():
        if isinstance(proc, IPAdapterAttnProcessor2_0) and not isinstance(proc, cls):
            new = cls(proc.hidden_size, proc.cross_attention_dim, proc.num_tokens, proc.scale)
            new.load_state_dict(proc.state_dict())
            processors[name] = new.to(next(proc.parameters()))
    unet.set_attn_processor(processors)


@torch.no_grad()
def init_projection(adapter, data: dict, text_encoder, tokenizer, ridge: float = 1e-2) -> None:
    """Fit the projection (Linear, then LayerNorm with the text tower's final γ, β) so that the
    image tokens of a reference start as the text states of "a COLOUR SHAPE" (see above)."""
    norm = text_encoder.get_submodule(
        "final_layer_norm" if hasattr(text_encoder, "final_layer_norm") else "text_model.final_layer_norm"
    )
    names = [f"a {m['color']} {m['shape']}" for m in data["meta"]]
    unique = sorted(set(names))
    ids = tokenizer(unique, padding="max_length", truncation=True, return_tensors="pt").input_ids
    states = text_encoder(ids.to(norm.weight.device)).last_hidden_state.cpu()[:, 1 : 1 + NUM_TOKENS]
    plain = (states - norm.bias.cpu()) / norm.weight.cpu()  # what LayerNorm's affine part turns into them
    targets = plain[torch.tensor([unique.index(n) for n in names])].reshape(len(names), -1)
    x = data["references"].reshape(-1, data["references"].shape[-1])
    y = targets.repeat_interleave(data["references"].shape[1], dim=0)
    x1 = torch.cat([x, torch.ones(len(x), 1)], 1)
    w = torch.linalg.solve(x1.T @ x1 + ridge * torch.eye(x1.shape[1]), x1.T @ y)
    projection = adapter["image_proj"]
    projection.image_embeds.weight.copy_(w[:-1].T)
    projection.image_embeds.bias.copy_(w[-1])
    projection.norm.weight.copy_(norm.weight)
    projection.norm.bias.copy_(norm.bias)


# --------------------------------------------------------------------------- training


def loss_on_batch(unet, alphas, noise_scheduler, z0, context, image_embeds, noise, t) -> torch.Tensor:
    zt = noise_scheduler.add_noise(z0, noise, t)
    pred = unet(
        zt, t, encoder_hidden_states=context, added_cond_kwargs={"image_embeds": [image_embeds[:, None]]}
    ).sample
    weight = min_snr_weight(noise_scheduler, alphas, t)
    if noise_scheduler.config.prediction_type == "epsilon":  # v's loss already weighs high noise
        weight = weight * torch.clamp((1 - alphas[t]) / alphas[t], min=1.0, max=HIGH_NOISE_WEIGHT)
    target = prediction_target(noise_scheduler, z0, noise, t)
    return (weight * ((pred - target) ** 2).mean(dim=(1, 2, 3))).mean()


def name_of(concatenated: bool) -> str:
    return "ip_adapter_concat" if concatenated else "ip_adapter"


def train(
    work: Path, out: Path, steps: int = STEPS, budget: float | None = None, ablation: bool = False
) -> None:
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    started = time.time()
    device = pick_device()
    pipe = StableDiffusionPipeline.from_pretrained(out / "toy-sd", dtype=torch.float32).to(device)
    unet, text_encoder, tokenizer = pipe.unet.eval(), pipe.text_encoder.eval(), pipe.tokenizer
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    encoder, processor = load_image_encoder(out / "toy-clip", device)
    data = build_dataset(pipe.vae, encoder, processor, work / "ip_adapter_data.safetensors", device)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # toy-sd's own schedule
    alphas = noise_scheduler.alphas_cumprod.to(device)
    scale = pipe.vae.config.scaling_factor

    adapter = attach(unet, encoder.config.projection_dim, concatenated=ablation).to(device)
    init_projection(adapter, data, text_encoder, tokenizer)
    adapter.train()
    opt = torch.optim.AdamW(adapter.parameters(), lr=LR, weight_decay=0.01)
    ema = EMA(adapter, decay=0.998)
    name = name_of(ablation)
    ckpt, clock = work / f"{name}.safetensors", work / f"{name}_seconds.json"
    start = load_checkpoint(ckpt, {"adapter": adapter}, opt, ema) if ckpt.exists() else 0
    spent = json.loads(clock.read_text())["seconds"] if start and clock.exists() else 0.0
    n = len(data["meta"])
    plan = StepPlan(steps, budget)
    for step in plan.run(start):
        rng = random.Random(SEED * 1_000_003 + step)
        g = torch.Generator().manual_seed(SEED * 1_000_003 + step)
        index = torch.randint(0, n, (BATCH,), generator=g)
        z0 = (data["mean"][index] + data["std"][index] * torch.randn(BATCH, 4, 8, 8, generator=g)) * scale
        which = torch.randint(0, 2, (BATCH,), generator=g)
        image_embeds = data["references"][index, which].clone()
        captions = []
        for i in index.tolist():
            m = data["meta"][i]
            obj = ObjectSpec(m["color"], m["shape"], m["size"], m["position"])
            captions.append(caption_for(obj, m["background"], rng))
        for i in range(BATCH):  # drop the image, the caption, or both (zeros = the unconditional image)
            r = rng.random()
            if r < DROP or 2 * DROP <= r < 3 * DROP:
                image_embeds[i] = 0
            if DROP <= r < 3 * DROP:
                captions[i] = ""
        ids = tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt").input_ids
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, 1000, (BATCH,), generator=g)
        with torch.no_grad():
            context = text_encoder(ids.to(device)).last_hidden_state
        for group in opt.param_groups:
            group["lr"] = warmup_lr(step, LR, 100) * cosine_decay(step, plan.total)
        loss = loss_on_batch(
            unet,
            alphas,
            noise_scheduler,
            z0.to(device),
            context,
            image_embeds.to(device),
            noise.to(device),
            t.to(device),
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
        opt.step()
        ema.update(adapter)
        if step % 50 == 0 or step == plan.total - 1:
            log(
                name,
                step,
                plan.total,
                loss=loss.item(),
                s_per_step=(time.time() - started) / (step - start + 1),
            )
        if (step + 1) % 250 == 0:
            save_checkpoint(ckpt, {"adapter": adapter}, opt, step + 1, ema)
            clock.write_text(json.dumps({"seconds": spent + time.time() - started}))
    steps = plan.total
    save_checkpoint(ckpt, {"adapter": adapter}, opt, steps, ema)
    seconds = spent + time.time() - started
    clock.write_text(json.dumps({"seconds": seconds}))
    ema.copy_to(adapter)
    folder = work / "toy-ip-adapter-concat" if ablation else out / FOLDER
    export(folder, adapter, encoder, processor, unet, steps, seconds, ablation)


def export(
    folder: Path, adapter, encoder, processor, unet, steps: int, seconds: float, ablation: bool
) -> None:
    """The adapter file (fp16) and its image encoder (fp16) in load_ip_adapter's layout, and the card."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(torch.float16) for k, v in adapter_state_dict(adapter).items()}
    metadata = {"base": "toy-sd", "attention": "concatenated" if ablation else "decoupled"}
    save_file(tensors, str(folder / WEIGHT_NAME), metadata=metadata)
    encoder.to(torch.float16).save_pretrained(folder / "image_encoder", safe_serialization=True)
    processor.save_pretrained(folder / "image_encoder")
    encoder.to(torch.float32)
    write_ip_adapter_card(folder, adapter, unet, steps, seconds, ablation)


def parameter_counts(adapter, unet) -> dict:
    trainable = sum(p.numel() for p in adapter.parameters())
    base = sum(
        p.numel() for n, p in unet.named_parameters() if "encoder_hid_proj" not in n and "_ip" not in n
    )
    return {"trainable": trainable, "base_unet": base}


def write_ip_adapter_card(folder: Path, adapter, unet, steps: int, seconds: float, ablation: bool) -> None:
    from .cards import hardware, write_card

    counts = parameter_counts(adapter, unet)
    scores_path = folder / "scores.json"
    scores = (
        json.loads(scores_path.read_text())
        if scores_path.exists()
        else {"held-out": "see bench/bench_ip_adapter.py"}
    )
    write_card(
        folder,
        FOLDER + (" (concatenated-attention ablation)" if ablation else ""),
        "An IP-Adapter (Ye et al. 2023) for toy-sd: toy CLIP's vision tower (frozen, in `image_encoder/`) embeds "
        f"the reference; a Linear + LayerNorm projection makes {NUM_TOKENS} image tokens; new W'_k, W'_v in every "
        "cross-attention layer of the frozen toy-sd UNet (W'_k copied from W_k, W'_v from zero) read them "
        + (
            "in ONE softmax with the text tokens (the ablation)."
            if ablation
            else "in a second, decoupled attention."
        )
        + f" Loads with `pipe.load_ip_adapter(folder, subfolder='', weight_name='{WEIGHT_NAME}')`.",
        {
            "data": f"{DATASET:,} single-shape renders (latents precomputed), each with two references: fresh renders "
            "of its shape and colour elsewhere (other position, size, background); captions mostly "
            "'a shape POSITION', image / caption / both dropped with p = 0.05 each",
            "objective": f"ε-prediction, min-SNR-γ (γ = {MIN_SNR_GAMMA:g}) and 1/SNR up to {HIGH_NOISE_WEIGHT:g} at high "
            f"noise, AdamW {LR:g}, 100-step warm-up, cosine "
            "decay, EMA 0.998, grad clip 1.0; toy-sd and the image encoder frozen",
            "steps": f"{steps:,} × batch {BATCH}",
            "parameters": f"{counts['trainable']:,} trainable (image projection + W'_k, W'_v in "
            f"{len(adapter['layers'])} cross-attention layers) against {counts['base_unet']:,} in the frozen "
            f"toy-sd UNet ({counts['trainable'] / counts['base_unet']:.1%})",
            "hardware": hardware(),
            "time": f"{seconds:.0f} s",
        },
        scores,
    )
