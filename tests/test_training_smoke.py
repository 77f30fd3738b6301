"""Smoke tests of the toy-model training stages (clip, vae, sd, ip2p, sd3 and its text-tuning
phase, controlnet).

For each stage, with its own model builder and loss on one fixed tiny batch: a few
optimizer steps lower the loss (overfitting a fixed batch must), and a checkpoint saved
with `common.save_checkpoint` and loaded into fresh modules restores weights, EMA and
optimizer state exactly, so that the next step equals the uninterrupted one.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from studio.toyworld.train import clip, common, controlnet, ip2p, sd, sd3, vae

STAGES = ("clip", "vae", "sd", "ip2p", "sd3", "sd3_text", "controlnet")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return common.build_tokenizer()


@pytest.fixture(scope="module")
def pairs():
    captions, images = common.sample_batch(random.Random(0), 4)
    return captions, images


@dataclass
class Run:
    modules: dict[str, torch.nn.Module]
    opt: torch.optim.Optimizer
    ema: common.EMA | None
    loss: Callable[[], torch.Tensor]
    clip_grad: float | None = None

    def step(self) -> float:
        loss = self.loss()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip_grad:
            params = [p for m in self.modules.values() for p in m.parameters()]
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad)
        self.opt.step()
        if self.ema is not None:
            self.ema.update(self._ema_target())
        return loss.item()

    def _ema_target(self) -> torch.nn.Module:
        return (
            next(iter(self.modules.values())) if len(self.modules) == 1 else torch.nn.ModuleDict(self.modules)
        )


def text_config(tokenizer):
    return clip.build_model(tokenizer).config.text_config


def make_run(stage: str, tokenizer, pairs, seed: int) -> Run:
    """The stage's model, optimizer, EMA and loss, as its train() sets them up, on a fixed batch."""
    captions, images = pairs
    torch.manual_seed(seed)
    ids = tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt").input_ids
    if stage == "clip":
        model = clip.build_model(tokenizer)
        opt = torch.optim.AdamW(model.parameters(), lr=clip.LR, weight_decay=0.01)
        pixels = clip.clip_pixels(images)
        return Run({"clip": model}, opt, None, lambda: clip.loss_on_batch(model, ids, pixels, captions)[0])
    if stage == "vae":
        model = vae.build_model()
        opt = torch.optim.AdamW(model.parameters(), lr=vae.LR, weight_decay=0.0)
        few = images[:2]
        return Run(
            {"vae": model}, opt, common.EMA(model, 0.995), lambda: vae.loss_on_batch(model, few)[0], 1.0
        )
    g = torch.Generator().manual_seed(100)  # the fixed batch: latents, noise, timesteps
    z0 = torch.randn(len(captions), 4, 8, 8, generator=g)
    noise = torch.randn(z0.shape, generator=g)
    if stage in ("sd", "ip2p"):
        from diffusers import DDPMScheduler
        from transformers import CLIPTextModel

        text_encoder = CLIPTextModel(text_config(tokenizer))
        unet = sd.build_unet(text_encoder.config.hidden_size)
        scheduler = DDPMScheduler.from_config(sd.scheduler_config())
        if stage == "ip2p":
            unet = ip2p.widen_unet(unet)
            cond = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, 1000, (len(captions),), generator=g)
        modules = {"unet": unet, "text_encoder": text_encoder}
        if stage == "sd":  # toy-sd trains its text tower with the position head beside it
            modules["position_head"] = sd.build_position_head(text_encoder.config.hidden_size)
            positions = torch.tensor([sd.position_class(c) for c in captions])
        opt = torch.optim.AdamW(
            [
                {"params": [p for k, m in modules.items() if k != "text_encoder" for p in m.parameters()]},
                {"params": text_encoder.parameters(), "lr": sd.TEXT_LR},
            ],
            lr=sd.LR,
            weight_decay=0.01,
        )
        alphas = scheduler.alphas_cumprod

        def loss():
            if stage == "ip2p":
                return sd.loss_on_batch(unet, text_encoder, scheduler, alphas, z0, ids, noise, t, cond)
            head = modules["position_head"]
            return sd.loss_on_batch(
                unet, text_encoder, scheduler, alphas, z0, ids, noise, t, None, head, positions
            )

        return Run(modules, opt, common.EMA(torch.nn.ModuleDict(modules), 0.999), loss, 1.0)
    if stage == "controlnet":
        return make_controlnet_run(tokenizer, ids, z0, noise, g)
    if stage == "sd3_text":
        return make_sd3_text_run(tokenizer, ids, z0, noise, captions, g)
    assert stage == "sd3"
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(100)  # the frozen text towers belong to the fixed batch, not to the run
    towers = [CLIPTextModelWithProjection(text_config(tokenizer)).eval() for _ in range(2)]
    torch.manual_seed(seed)
    transformer = sd3.build_transformer()
    pipe = sd3.build_pipeline(transformer, None, towers[0], towers[1], tokenizer)
    context, pooled = sd3.encode_captions(pipe, captions, torch.device("cpu"))
    t = torch.sigmoid(torch.randn(len(captions), generator=g))
    sd3.collapse_padding(transformer)
    opt = sd3.build_optimizer(transformer)

    def loss():
        return sd3.loss_on_batch(transformer, z0, context, pooled, noise, t)

    return Run({"transformer": transformer}, opt, common.EMA(transformer, 0.999), loss, 1.0)


def make_sd3_text_run(tokenizer, ids, z0, noise, captions, g) -> Run:
    """toy-sd3's phase 2: both towers trained beside the transformer, with the position head."""
    from transformers import CLIPTextModelWithProjection

    towers = [CLIPTextModelWithProjection(text_config(tokenizer)) for _ in range(2)]
    transformer = sd3.build_transformer()
    head = sd.build_position_head(sum(t.config.hidden_size for t in towers))
    positions = torch.tensor([sd.position_class(c) for c in captions])
    t = torch.sigmoid(torch.randn(len(captions), generator=g))
    sd3.collapse_padding(transformer)
    modules = {
        "transformer": transformer,
        "text_encoder": towers[0],
        "text_encoder_2": towers[1],
        "head": head,
    }
    opt = sd3.build_tuning_optimizer(transformer, towers, head)

    def loss():
        return sd3.text_tuning_loss(transformer, towers, head, z0, ids, noise, t, positions)

    return Run(modules, opt, common.EMA(torch.nn.ModuleDict(modules), sd3.TUNE_EMA), loss, 1.0)


def make_controlnet_run(tokenizer, ids, z0, noise, g) -> Run:
    """A ControlNet on a frozen random UNet and text tower (as train_kind freezes toy-sd's)."""
    from diffusers import DDPMScheduler
    from transformers import CLIPTextModel

    state = torch.random.get_rng_state()
    torch.manual_seed(100)  # the frozen base belongs to the fixed batch, not to the run
    text_encoder = CLIPTextModel(text_config(tokenizer)).eval().requires_grad_(False)
    unet = sd.build_unet(text_encoder.config.hidden_size).eval().requires_grad_(False)
    torch.random.set_rng_state(state)
    net = controlnet.build_controlnet(unet)
    scheduler = DDPMScheduler.from_config(sd.scheduler_config())
    cond = (torch.rand(len(ids), 3, 64, 64, generator=g) > 0.8).float()
    t = torch.randint(0, 1000, (len(ids),), generator=g)
    with torch.no_grad():
        context = text_encoder(ids).last_hidden_state
    opt = torch.optim.AdamW(net.parameters(), lr=controlnet.LR * 5, weight_decay=0.01)

    def loss():
        return controlnet.loss_on_batch(
            net, unet, context, scheduler.alphas_cumprod, scheduler, z0, cond, noise, t
        )

    return Run({"controlnet": net}, opt, common.EMA(net, 0.998), loss, 1.0)


@pytest.mark.parametrize("stage", STAGES)
def test_steps_on_a_fixed_batch_lower_the_loss(stage, tokenizer, pairs):
    run = make_run(stage, tokenizer, pairs, seed=0)
    torch.manual_seed(1)
    losses = [run.step() for _ in range(20)]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.8 * first, f"{stage}: {losses}"


def optimizer_tensors(opt) -> dict:
    return {(pid, k): v.clone() for pid, s in opt.state_dict()["state"].items() for k, v in s.items()}


def weights(run: Run) -> dict:
    return {(n, k): v.clone() for n, m in run.modules.items() for k, v in m.state_dict().items()}


def assert_same(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        x, y = torch.as_tensor(a[k]).float(), torch.as_tensor(b[k]).float()
        assert x.shape == y.shape and torch.allclose(x, y, rtol=0, atol=atol), k


@pytest.mark.parametrize("stage", STAGES)  # clip: a 0-dim parameter (logit_scale)
def test_resume_restores_state_and_continues_identically(stage, tokenizer, pairs, tmp_path):
    a = make_run(stage, tokenizer, pairs, seed=0)
    torch.manual_seed(1)
    for _ in range(2):
        a.step()
    ckpt = tmp_path / "ckpt.safetensors"
    common.save_checkpoint(ckpt, a.modules, a.opt, 2, a.ema)
    saved = (
        weights(a),
        optimizer_tensors(a.opt),
        {k: v.clone() for k, v in a.ema.shadow.items()} if a.ema else None,
    )
    torch.manual_seed(2)  # the next step's randomness (the VAE's posterior sample)
    a.step()

    b = make_run(stage, tokenizer, pairs, seed=1)  # a different initialisation
    assert not all(torch.equal(v, saved[0][k]) for k, v in weights(b).items())
    assert common.load_checkpoint(ckpt, b.modules, b.opt, b.ema) == 2
    assert_same(weights(b), saved[0])
    assert_same(optimizer_tensors(b.opt), saved[1])
    assert b.opt.state_dict()["param_groups"][0]["lr"] == a.opt.state_dict()["param_groups"][0]["lr"]
    if b.ema:
        assert_same(b.ema.shadow, saved[2])
        assert b.ema.updates == 2
    torch.manual_seed(2)
    b.step()
    assert_same(weights(b), weights(a), atol=1e-6)
    assert_same(optimizer_tensors(b.opt), optimizer_tensors(a.opt), atol=1e-6)
    if b.ema:
        assert_same(b.ema.shadow, a.ema.shadow, atol=1e-6)


def test_sd3_collapsed_padding_equals_the_pipelines_full_context(tokenizer):
    """One zero token weighted ×256 in attention = the 256 zero T5 tokens encode_prompt appends."""
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    towers = [CLIPTextModelWithProjection(text_config(tokenizer)).eval() for _ in range(2)]
    transformer = sd3.build_transformer().eval()
    pipe = sd3.build_pipeline(transformer, None, towers[0], towers[1], tokenizer)
    captions = ["a red circle on the left", ""]
    full, _, pooled, _ = pipe.encode_prompt(
        captions, None, None, device="cpu", do_classifier_free_guidance=False
    )
    context, pooled_2 = sd3.encode_captions(pipe, captions, torch.device("cpu"))
    assert full.shape[1] == 32 + sd3.T5_TOKENS and torch.equal(full[:, :32], context)
    assert torch.allclose(pooled, pooled_2, atol=1e-6)
    ids = tokenizer(
        captions, padding="max_length", max_length=32, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():  # phase 2 computes the same context through the trainable towers
        tuned, tuned_pooled = sd3.clip_context(towers, ids)
    assert torch.allclose(tuned, context, atol=1e-6) and torch.allclose(tuned_pooled, pooled, atol=1e-6)
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.9])
    with torch.no_grad():
        reference = transformer(
            z, encoder_hidden_states=full, pooled_projections=pooled, timestep=t * 1000
        ).sample
        sd3.collapse_padding(transformer)
        ctx = sd3.with_padding_token(context)
        collapsed = transformer(
            z, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t * 1000
        ).sample
    assert torch.allclose(reference, collapsed, atol=1e-5)


def export_fresh_sd3(tokenizer, out) -> None:
    """`sd3.export` of an untrained toy-sd3 (random towers, VAE shift 0.1, scale 0.9) into `out`."""
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    towers = [CLIPTextModelWithProjection(text_config(tokenizer)).eval() for _ in range(2)]
    autoencoder = vae.build_model()
    autoencoder.register_to_config(shift_factor=0.1, scaling_factor=0.9)
    pipe = sd3.build_pipeline(sd3.build_transformer(), autoencoder, towers[0], towers[1], tokenizer)
    sd3.export(out, pipe, {"data": "none"})


def test_sd3_export_loads_and_generates(tokenizer, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    export_fresh_sd3(tokenizer, tmp_path)
    loaded = StableDiffusion3Pipeline.from_pretrained(
        tmp_path / "toy-sd3", dtype=torch.float32, text_encoder_3=None, tokenizer_3=None
    )
    assert loaded.vae.config.shift_factor == 0.1 and loaded.scheduler.config.shift == sd3.SHIFT
    generator = torch.Generator().manual_seed(0)
    image = loaded("a red circle", num_inference_steps=2, generator=generator).images[0]
    assert image.size == (64, 64)
    assert (tmp_path / "toy-sd3" / "README.md").exists()


def test_sd3_composite_tuning_draws_captions_of_several_objects_three_times_as_often():
    captions = ["a red circle", "a red circle to the left of a blue square", "three red circles", "a square"]
    weights = sd3.composite_weights(captions, sd3.COMPOSITE_WEIGHT)
    assert weights.tolist() == [1.0, 3.0, 3.0, 1.0]
    data = {"captions": captions, "mean": torch.zeros(4, 4, 8, 8), "std": torch.ones(4, 4, 8, 8)}
    g = torch.Generator().manual_seed(0)
    drawn = torch.cat([sd3.draw_batch(g, data, (0.0, 1.0), weights)[0] for _ in range(100)])
    composite = ((drawn == 1) | (drawn == 2)).float().mean().item()
    assert abs(composite - 0.75) < 0.02, composite  # 6 of 8 weight units
    uniform = torch.cat([sd3.draw_batch(g, data, (0.0, 1.0))[0] for _ in range(100)])
    assert abs(((uniform == 1) | (uniform == 2)).float().mean().item() - 0.5) < 0.02


def test_sd3_tune_shipped_tunes_the_exported_model_in_place_and_it_still_loads(tokenizer, tmp_path):
    """`python -m studio.toyworld.train sd3 --tune-shipped`: phase 3 alone, on an exported toy-sd3."""
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import load_file, save_file

    out, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    export_fresh_sd3(tokenizer, out)
    captions, _ = common.sample_batch(random.Random(1), 8)
    save_file(
        {"mean": torch.randn(8, 4, 8, 8), "std": torch.ones(8, 4, 8, 8) * 0.1},
        work / "sd3_latents.safetensors",
    )
    (work / "sd3_latents.json").write_text(json.dumps(captions))
    weights = out / "toy-sd3" / "transformer" / "diffusion_pytorch_model.safetensors"
    vae_weights = out / "toy-sd3" / "vae" / "diffusion_pytorch_model.safetensors"
    before, vae_before = load_file(weights), vae_weights.read_bytes()
    sd3.tune_shipped(work, out, steps=3)
    after = load_file(weights)
    assert (
        any(not torch.equal(before[k], after[k]) for k in before)
        and after[next(iter(after))].dtype == torch.float16
    )
    assert vae_weights.read_bytes() == vae_before
    config = json.loads((out / "toy-sd3" / "transformer" / "config.json").read_text())
    assert "_name_or_path" not in config and config["num_layers"] == 6
    assert (work / "sd3_compose.safetensors").exists()  # resumable
    loaded = StableDiffusion3Pipeline.from_pretrained(
        out / "toy-sd3", dtype=torch.float32, text_encoder_3=None, tokenizer_3=None
    )
    image = loaded("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[
        0
    ]
    assert image.size == (64, 64)


def test_ip2p_widened_unet_starts_as_the_text_to_image_unet(tokenizer):
    """Brooks et al. §3.2: the 4 new input channels start at zero, so the image is ignored at first."""
    torch.manual_seed(0)
    unet = sd.build_unet(text_config(tokenizer).hidden_size).eval()
    wide = ip2p.widen_unet(unet).eval()
    z, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    context = torch.randn(2, 77, text_config(tokenizer).hidden_size)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        plain = unet(z, t, encoder_hidden_states=context).sample
        widened = wide(torch.cat([z, cond], dim=1), t, encoder_hidden_states=context).sample
    assert wide.config.in_channels == 8
    assert torch.allclose(plain, widened, atol=1e-5)


def test_a_fresh_controlnet_leaves_the_base_model_bit_identical_and_its_zero_convs_learn(tokenizer):
    """Zhang et al. §3.1: every zero convolution outputs 0 at first, so the UNet's output is
    exactly the base model's; yet their gradients are not 0, so the first step moves them."""
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    text_encoder = CLIPTextModel(text_config(tokenizer)).eval()
    unet = sd.build_unet(text_encoder.config.hidden_size).eval().requires_grad_(False)
    net = controlnet.build_controlnet(unet)
    for conv in controlnet.zero_convolutions(net):
        assert not conv.weight.any() and not conv.bias.any()
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    cond = torch.rand(2, 3, 64, 64)
    context = text_encoder(
        tokenizer(["a red circle", ""], padding="max_length", return_tensors="pt").input_ids
    )
    context = context.last_hidden_state.detach()
    down, mid = net(z, t, encoder_hidden_states=context, controlnet_cond=cond, return_dict=False)
    with torch.no_grad():
        base = unet(z, t, encoder_hidden_states=context).sample
    controlled = unet(
        z,
        t,
        encoder_hidden_states=context,
        down_block_additional_residuals=down,
        mid_block_additional_residual=mid,
    ).sample
    assert torch.equal(controlled, base)
    target = torch.randn_like(controlled)
    ((controlled - target) ** 2).mean().backward()
    for conv in controlnet.zero_convolutions(net)[:-1]:  # each block's Z reads a non-zero feature
        assert conv.weight.grad.abs().sum() > 0
    # The condition's Z feeds the copied encoder, whose way out is still the zero convs: its
    # gradient is 0 on this first step and flows from the second on, once they have moved.
    assert not net.controlnet_cond_embedding.conv_out.weight.grad.any()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    opt.step()
    opt.zero_grad()
    down, mid = net(z, t, encoder_hidden_states=context, controlnet_cond=cond, return_dict=False)
    controlled = unet(
        z,
        t,
        encoder_hidden_states=context,
        down_block_additional_residuals=down,
        mid_block_additional_residual=mid,
    ).sample
    assert not torch.equal(controlled, base)
    ((controlled - target) ** 2).mean().backward()
    assert net.controlnet_cond_embedding.conv_out.weight.grad.abs().sum() > 0


def test_a_time_budget_fits_the_step_count_to_the_measured_pace(monkeypatch):
    """--minutes: after the probe steps the plan keeps as many steps as the budget allows."""
    now = [0.0]
    monkeypatch.setattr(common.time, "time", lambda: now[0])
    plan = common.StepPlan(10**9, budget=100.0)
    seen = []
    for step in plan.run(0):
        seen.append(step)
        now[0] += 0.5  # every step takes half a second
    # 100 s at 0.5 s a step: 200 steps in all, the learning-rate schedule told so at step 60
    assert plan.total == len(seen) == 200 and seen == list(range(200))
    fixed = common.StepPlan(30)
    assert list(fixed.run(10)) == list(range(10, 30)) and fixed.total == 30


def test_a_time_budget_for_a_fixed_step_stage_is_refused(tmp_path, capsys):
    from studio.toyworld.train.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["clip", "--minutes", "1", "--work", str(tmp_path), "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "the clip stage trains a fixed number of steps" in capsys.readouterr().err
    assert not (tmp_path / "toy-clip").exists()


def test_v_prediction_with_zero_terminal_snr_trains_the_last_timestep_too(monkeypatch, tokenizer, pairs):
    """Lin et al. 2024's schedule for the sd stage (and every stage built on toy-sd): ᾱ_T = 0,
    the target is v, which at t = T is −z_0 (the picture from pure noise), and min-SNR keeps a
    weight of 1 there, where ε's min(SNR, γ)/SNR would be 0/0."""
    from diffusers import DDIMScheduler, DDPMScheduler

    monkeypatch.setattr(sd, "PREDICTION", "v_prediction")
    monkeypatch.setattr(sd, "ZERO_TERMINAL_SNR", True)
    scheduler = DDPMScheduler.from_config(sd.scheduler_config())
    alphas = scheduler.alphas_cumprod
    assert alphas[-1] == 0
    t = torch.tensor([0, 500, 999])
    weight = sd.min_snr_weight(scheduler, alphas, t)
    assert torch.isfinite(weight).all() and weight[-1] == 1 and weight[0] < 0.01
    z0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    target = sd.prediction_target(scheduler, z0, noise, t)
    assert torch.allclose(target[2], -z0[2]) and not torch.allclose(target[0], noise[0])
    sampler = DDIMScheduler(**sd.scheduler_config())
    sampler.set_timesteps(25)
    assert sampler.timesteps[0] == 999  # trailing spacing starts sampling at the zero-SNR step

    run = make_run("sd", tokenizer, pairs, seed=0)
    torch.manual_seed(1)
    losses = [run.step() for _ in range(20)]
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses


def test_the_position_head_names_a_single_objects_position_phrase_and_nothing_else():
    assert sd.POSITION_CLASSES[sd.position_class("a red circle on the left")] == "on the left"
    assert sd.POSITION_CLASSES[sd.position_class("a small blue square at the top on a white background")] == (
        "at the top"
    )
    for caption in ("a red circle", "a red circle to the left of a blue square", "two red circles"):
        assert sd.position_class(caption) == 0, caption


def test_clip_hard_negatives_swap_the_shape_words_and_nothing_else():
    rng = random.Random(0)
    for caption in ("a red circle on the left", "two blue squares", "a small triangle above a green circle"):
        negative = clip.hard_negative(caption, rng)
        words, swapped = caption.split(), negative.split()
        changed = [(a, b) for a, b in zip(words, swapped, strict=True) if a != b]
        assert changed and all(
            a.rstrip("s") in clip.SHAPES and b.rstrip("s") in clip.SHAPES for a, b in changed
        )
        assert all(a.endswith("s") == b.endswith("s") for a, b in changed)
    assert clip.hard_negative("a red shape on the left", rng).split()[1] in set(clip.COLORS) - {"red"}
    # a caption with nothing to swap is its own negative, and counts as a positive there
    assert clip.hard_negative("a shape", rng) == "a shape"
    targets = clip.positives(
        ["a shape", "a red circle"], "cpu", ["a shape", "a red circle", "a shape", "a red square"]
    )
    assert targets.tolist() == [[0.5, 0.0, 0.5, 0.0], [0.0, 1.0, 0.0, 0.0]]


def test_clip_vision_leg_trains_the_vision_tower_and_leaves_the_text_tower_bit_identical(
    tmp_path, monkeypatch
):
    tokenizer = clip.stage_tokenizer(tmp_path)
    assert clip.stage_tokenizer(tmp_path).get_vocab() == tokenizer.get_vocab()  # the saved one, on resume too
    torch.manual_seed(0)
    model = clip.build_model(tokenizer)
    text_before = {k: v.clone() for k, v in model.text_model.state_dict().items()}
    vision_before = {k: v.clone() for k, v in model.vision_model.state_dict().items()}
    monkeypatch.setattr(clip, "BATCH", 8)
    losses = []
    monkeypatch.setattr(clip, "log", lambda stage, step, total, loss: losses.append(loss))
    clip.train_vision_tower(model, tokenizer, tmp_path, 3)
    assert len(losses) == 2 and (tmp_path / "clip_vision.safetensors").exists()
    assert all(torch.equal(v, model.text_model.state_dict()[k]) for k, v in text_before.items())
    assert any(not torch.equal(v, model.vision_model.state_dict()[k]) for k, v in vision_before.items())
