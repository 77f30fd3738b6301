"""One training run, as a job: pictures → (class pictures) → method → loop → outputs.

The loop is the ε-prediction (or v-prediction) objective of latent diffusion,
L = E‖ε − ε_θ(z_t, t, c)‖² (Rombach et al. 2022, eq. 2), plus DreamBooth's prior term
where asked. Every `checkpoint_every` steps (and on cancel) the trainable weights, the
optimiser, the learning-rate schedule, the step and the random generators are written
atomically to `out_dir/checkpoints/`; a run started on the same `out_dir` continues from
the newest one exactly where it stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from PIL import Image

from ..settings import SettingsError
from . import data, dreambooth, lora, textual_inversion
from .settings import TrainingSettings

METHODS = {"lora": lora, "dreambooth": dreambooth, "textual-inversion": textual_inversion}
KEEP_CHECKPOINTS = 2
SAMPLES = 4
MAX_GRAD_NORM = 1.0


def run(s: TrainingSettings, models, ctx) -> dict:
    """Train, checkpoint, sample and save; returns what was made and measured."""
    from ..jobs import JobCancelled

    started = time.perf_counter()
    out_dir = Path(ctx.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "settings.json").write_text(json.dumps(s.to_dict(), indent=1))
    method = METHODS[s.method]
    spec = models.resolve(s.model)

    with models.training_copy(s.model) as pipe:
        device = pipe.unet.device
        resolution = s.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor

        # 1. Pictures: the instance set, and the class set the base model makes (prior preservation).
        pictures = data.load_pictures(s.images, s.instance_prompt, resolution, s.crop)
        ctx.report(0, s.steps, pictures.describe())
        prior = ([], [])  # class pictures and their prompts
        if s.prior_preservation:
            cache = models.user_dir / "class-pictures" if models.user_dir else out_dir / "class-pictures"
            prior = dreambooth.class_pictures(
                pipe,
                s,
                spec.source,
                resolution,
                cache,
                spec.defaults,
                lambda done, total: ctx.report(0, s.steps, f"class pictures {done}/{total}"),
            )

        # 2. Words trained earlier (textual inversion) that the prompts use come in as txt2img
        #    loads them, so a LoRA can be trained on top of a learned word (pivotal tuning).
        if s.method != "textual-inversion":
            prompts = (s.instance_prompt, s.class_prompt, s.sample_prompt, *pictures.captions)
            words = models.embeddings_for(*prompts)
            for path in words:
                pipe.load_textual_inversion(path)
            if words:
                ctx.report(0, s.steps, "trained words loaded: " + ", ".join(Path(w).stem for w in words))

        # 3. The method decides what trains (LoRA's initial A is drawn from the seed); the
        #    prior term's base-model target needs the untrained model beside it.
        base = method.frozen_base(pipe, s) if prior[0] and s.prior_target == "base-model" else None
        torch.manual_seed(s.seed)
        params, after_step = method.prepare(pipe, s)
        if s.gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
        accelerator = _accelerator(s, device)
        optimizer = torch.optim.AdamW(
            params, lr=s.learning_rate, weight_decay=0.0 if s.method == "textual-inversion" else 1e-2
        )
        schedule = _lr_schedule(s, optimizer)
        optimizer, schedule = accelerator.prepare(optimizer, schedule)
        noise_scheduler = _noise_scheduler(pipe)
        generator = torch.Generator().manual_seed(s.seed)

        # 4. Resume from the newest checkpoint of this out_dir, if any.
        step = _resume(out_dir, pipe, optimizer, schedule, generator)
        if step:
            ctx.report(step, s.steps, f"resumed from step {step}")

        # 5. The loop.
        encode = _Encoder(pipe, s, device)
        try:
            while step < s.steps:
                ctx.check_cancel()
                pipe.unet.train()
                loss_value = 0.0
                for _ in range(s.gradient_accumulation):
                    with accelerator.autocast():
                        loss = _loss(
                            pipe, s, encode, noise_scheduler, pictures, prior, base, generator, device
                        )
                    accelerator.backward(loss / s.gradient_accumulation)
                    loss_value += loss.item() / s.gradient_accumulation
                accelerator.clip_grad_norm_(params, MAX_GRAD_NORM)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                if after_step:
                    after_step()
                step += 1
                ctx.report(
                    step, s.steps, f"step {step}/{s.steps}", loss=loss_value, lr=schedule.get_last_lr()[0]
                )
                if step % s.checkpoint_every == 0 or step == s.steps:
                    _save_checkpoint(out_dir, step, pipe, optimizer, schedule, generator)
                if step % s.sample_every == 0 or step == s.steps:
                    ctx.add_sample(_samples(pipe, s, step, resolution, out_dir, spec.defaults))
        except JobCancelled:
            _save_checkpoint(out_dir, step, pipe, optimizer, schedule, generator)
            raise

        # 6. Outputs: in out_dir, and in the studio's library where txt2img finds them at once.
        output = method.save(pipe, s, out_dir)
        installed = models.install_trained(output, s.method, spec, s.to_dict())
    return {
        "output": str(output),
        "installed": str(installed),
        "output_bytes": _size(output),
        "steps": step,
        "loss": loss_value,
        "seconds": round(time.perf_counter() - started, 1),
        "pictures": pictures.describe(),
    }


class _Encoder:
    """Latents of pictures (the VAE is frozen) and text embeddings, cached where nothing trains them."""

    def __init__(self, pipe, s: TrainingSettings, device):
        self.pipe, self.device = pipe, device
        self.text_trains = s.train_text_encoder or s.method == "textual-inversion"
        self.cache: dict[str, torch.Tensor] = {}
        self.base_cache: dict[str, torch.Tensor] = {}
        self.moments: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def latents(self, views: list, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """z = (μ + σ·n − shift) × scale for each view; μ, σ cached per view key where the view
        is always the same picture (centre crop), else encoded afresh."""
        vae = self.pipe.vae
        moments = [self.moments.get(key) if key is not None else None for key in views]
        fresh = [i for i, m in enumerate(moments) if m is None]
        if fresh:
            with torch.no_grad():
                dist = vae.encode(pixels[fresh].to(self.device, vae.dtype)).latent_dist
            for j, i in enumerate(fresh):
                moments[i] = (dist.mean[j], dist.std[j])
                if views[i] is not None:
                    self.moments[views[i]] = moments[i]
        mean = torch.stack([m[0] for m in moments])
        std = torch.stack([m[1] for m in moments])
        noise = torch.randn(mean.shape, generator=generator).to(self.device, mean.dtype)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (mean + std * noise - shift) * vae.config.scaling_factor

    def text(self, captions: list[str]) -> torch.Tensor:
        if self.text_trains:
            return self._encode(captions)
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            with torch.no_grad():
                for caption, row in zip(missing, self._encode(missing), strict=True):
                    self.cache[caption] = row
        return torch.stack([self.cache[c] for c in captions])

    def base_text(self, captions: list[str], text_encoder) -> torch.Tensor:
        """The frozen base's text embeddings (call under no_grad, with the base switched in)."""
        if not self.text_trains:
            return self.text(captions)
        for caption in dict.fromkeys(captions):
            if caption not in self.base_cache:
                self.base_cache[caption] = self._encode([caption], text_encoder)[0]
        return torch.stack([self.base_cache[c] for c in captions])

    def _encode(self, captions: list[str], text_encoder=None) -> torch.Tensor:
        tokenizer = self.pipe.tokenizer
        ids = tokenizer(
            captions,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return (text_encoder or self.pipe.text_encoder)(ids)[0]


def _loss(pipe, s, encode, noise_scheduler, pictures, prior, base, generator, device) -> torch.Tensor:
    """ε-prediction MSE on a batch of instance views, plus λ × the same on class views.

    With `base` (the base-model prior target) a class view's target is the frozen base
    model's own prediction at the same z_t, t and caption rather than the noise ε that made
    z_t: the class term then asks the trained model to predict what the base model predicts,
    which is what Ruiz et al.'s eq. 2 approximates with generated pictures, without the
    variance of regressing one noise draw (a distillation form of the prior term). Being
    exact, that target can also be held at high noise: an ε-prediction class error counts
    at least as the clean-latent error it implies (`_clean_latent_weight`)."""
    picks = torch.randint(0, len(pictures.pictures), (s.batch_size,), generator=generator).tolist()
    views = [("instance", i) for i in picks]
    captions = [pictures.captions[i] for i in picks]
    class_pictures, class_captions = prior
    if class_pictures:
        picks = torch.randint(0, len(class_pictures), (s.batch_size,), generator=generator).tolist()
        views += [("class", i) for i in picks]
        captions += [class_captions[i] for i in picks]
    res = pictures.resolution
    sources = {"instance": pictures.pictures, "class": class_pictures}
    pixels, keys = [], []
    for kind, i in views:
        flipped = s.flip and bool(torch.rand((), generator=generator) < 0.5)
        pixels.append(data.to_tensor(sources[kind][i], res, pictures.crop, flipped, generator))
        keys.append((kind, i, flipped) if pictures.crop == "center" else None)
    z0 = encode.latents(keys, torch.stack(pixels), generator)
    noise = torch.randn(z0.shape, generator=generator).to(device, z0.dtype)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(views),), generator=generator).to(
        device
    )
    zt = noise_scheduler.add_noise(z0, noise, t)
    target = (
        noise
        if noise_scheduler.config.prediction_type == "epsilon"
        else noise_scheduler.get_velocity(z0, noise, t)
    )
    if base is not None:
        n = s.batch_size
        with torch.no_grad(), base() as (unet, text_encoder):
            context = encode.base_text(captions[n:], text_encoder)
            target = torch.cat([target[:n], unet(zt[n:], t[n:], encoder_hidden_states=context).sample])
    pred = pipe.unet(zt, t, encoder_hidden_states=encode.text(captions)).sample
    errors = ((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3))
    if not class_pictures:
        return errors.mean()
    class_errors = errors[s.batch_size :]
    if base is not None and noise_scheduler.config.prediction_type == "epsilon":
        class_errors = class_errors * _clean_latent_weight(noise_scheduler, t[s.batch_size :])
    return errors[: s.batch_size].mean() + s.prior_weight * class_errors.mean()


def _clean_latent_weight(noise_scheduler, t) -> torch.Tensor:
    """max(1, 1/SNR(t)): an ε error of the distilled class term counted at least as the
    clean-latent error it implies, ‖Δx̂_0‖² = ‖Δε‖² / SNR(t).

    ε-prediction's loss all but ignores x̂_0 at high noise (Salimans & Ho 2022, §4), where a
    scene's layout is decided; regressing to the noise that can't be predicted there would
    only add variance, but the base model's own prediction is an exact target, so the
    prior term can hold the layout of ordinary prompts where the instance term moves it."""
    alphas = noise_scheduler.alphas_cumprod.to(t.device)[t]
    return torch.clamp((1 - alphas) / alphas, min=1.0)


def _accelerator(s: TrainingSettings, device):
    from accelerate import Accelerator

    if s.mixed_precision != "no" and device.type != "cuda":
        raise SettingsError(
            f"mixed precision {s.mixed_precision} needs a CUDA GPU; this run is on {device.type}"
        )
    return Accelerator(mixed_precision=s.mixed_precision, device_placement=False, cpu=device.type == "cpu")


def _lr_schedule(s: TrainingSettings, optimizer):
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        s.lr_schedule, optimizer, num_warmup_steps=s.warmup_steps, num_training_steps=s.steps
    )


def _noise_scheduler(pipe):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def _samples(pipe, s: TrainingSettings, step: int, resolution: int, out_dir: Path, defaults: dict) -> Path:
    """A row of pictures of the sample prompt, same seeds every time, so steps compare."""
    prompt = s.sample_prompt or s.instance_prompt
    pipe.unet.eval()
    with torch.no_grad():
        images = pipe(
            [prompt] * SAMPLES,
            num_inference_steps=defaults.get("steps", 25),
            guidance_scale=defaults.get("guidance", 7.5),
            width=resolution,
            height=resolution,
            generator=[torch.Generator().manual_seed(s.seed + i) for i in range(SAMPLES)],
        ).images
    row = Image.new("RGB", (resolution * SAMPLES, resolution))
    for i, image in enumerate(images):
        row.paste(image, (i * resolution, 0))
    path = out_dir / "samples" / f"step-{step:06d}.png"
    path.parent.mkdir(exist_ok=True)
    row.save(path)
    return path


# ---------------------------------------------------------------------------- checkpoints


def _trainable(pipe) -> dict[str, torch.nn.Parameter]:
    return {
        f"{name}.{key}": p
        for name in ("unet", "text_encoder")
        for key, p in getattr(pipe, name).named_parameters()
        if p.requires_grad
    }


def _save_checkpoint(out_dir: Path, step: int, pipe, optimizer, schedule, generator) -> None:
    """Write checkpoints/step-N atomically (a temporary folder renamed into place); keep the newest two."""
    from safetensors.torch import save_file

    root = out_dir / "checkpoints"
    final = root / f"step-{step:06d}"
    if final.exists():
        return
    partial = root / f".partial-{step:06d}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file(
        {k: p.detach().cpu().contiguous() for k, p in _trainable(pipe).items()},
        partial / "trainable.safetensors",
    )
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
    }
    torch.save(state, partial / "state.pt")
    os.replace(partial, final)
    for old in sorted(root.glob("step-*"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)


def _resume(out_dir: Path, pipe, optimizer, schedule, generator) -> int:
    """Load the newest complete checkpoint; 0 where there is none."""
    from safetensors.torch import load_file

    found = sorted((out_dir / "checkpoints").glob("step-*"))
    if not found:
        return 0
    newest = found[-1]
    weights = load_file(newest / "trainable.safetensors")
    trainable = _trainable(pipe)
    if set(weights) != set(trainable) or any(weights[k].shape != p.shape for k, p in trainable.items()):
        raise SettingsError(
            f"{out_dir} holds a checkpoint of a different training setup; use a new output folder"
        )
    with torch.no_grad():
        for key, p in trainable.items():
            p.copy_(weights[key].to(p.device, p.dtype))
    state = torch.load(newest / "state.pt", weights_only=True)  # tensors and numbers only: no pickled code
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    return int(state["step"])


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
