"""The trainer on the tiny model: outputs the ecosystem reads, exact resume, refusals.

Whether training teaches the toy world a star is measured by bench/bench_trainer.py; these
tests check what a user relies on whatever the model: files that load, a run that
continues where it stopped, patches that leave generation untouched, clear refusals.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from studio.models import LoraRef, ModelManager
from studio.settings import SettingsError
from studio.toyworld.captions import parse_caption, sample_scene
from studio.toyworld.render import render
from studio.training import trainer
from studio.training.settings import TrainingSettings
from studio.txt2img import Txt2ImgSettings
from studio.txt2img import run as txt2img


class Context:
    """The part of studio.jobs.JobContext the trainer uses."""

    def __init__(self, out_dir: Path):
        self.out_dir, self.samples, self.messages = out_dir, [], []

    def report(self, step, total, message="", **metrics):
        self.messages.append(message)

    def add_sample(self, path):
        self.samples.append(Path(path))

    def check_cancel(self):
        pass


@pytest.fixture(scope="module")
def stars(tmp_path_factory) -> Path:
    import random

    folder = tmp_path_factory.mktemp("stars")
    rng = random.Random(0)
    for i in range(3):
        render(sample_scene(parse_caption("a large shape"), rng, shape_pool=("star",))).save(
            folder / f"star{i}.png"
        )
    (folder / "star0.txt").write_text("a sks shape on a white background")
    (folder / "broken.png").write_bytes(b"not a picture")
    return folder


@pytest.fixture
def models(tmp_path):
    return ModelManager(device="cpu", user_dir=tmp_path / "library")


def settings(tiny_sd, stars, **changes) -> TrainingSettings:
    base = dict(
        model=str(tiny_sd), images=str(stars), steps=4, learning_rate=1e-2, checkpoint_every=2, sample_every=4
    )
    return TrainingSettings(**{**base, **changes})


def pixels(models, **changes):
    s = Txt2ImgSettings(**{"prompt": "a red circle", "model": "toy-sd", "seed": 3, "steps": 4, **changes})
    return np.asarray(txt2img(s, models).images[0])


def test_a_lora_run_gives_a_diffusers_lora_that_txt2img_lists_and_undoes(tiny_sd, stars, models, tmp_path):
    s = settings(tiny_sd, stars, name="tiny-star")
    ctx = Context(tmp_path / "run")
    result = trainer.run(s, models, ctx)

    assert "broken.png" in result["pictures"]  # skipped, and said so
    assert "3 pictures" in result["pictures"]
    assert [p.name for p in ctx.samples] == ["step-000004.png"]
    assert "tiny-star" in [spec.name for spec in models.loras()]
    keys = load_file(result["installed"])
    assert keys and all(k.startswith("unet.") and "lora" in k for k in keys)

    before = pixels(models, model=str(tiny_sd))
    with_lora = pixels(models, model=str(tiny_sd), loras=(LoraRef("tiny-star", 1.0),))
    after = pixels(models, model=str(tiny_sd))
    assert not np.array_equal(before, with_lora)
    assert np.array_equal(before, after)


def test_fused_lora_matches_the_unfused_one(tiny_sd, stars, models, tmp_path):
    result = trainer.run(settings(tiny_sd, stars, rank=2, alpha=4.0), models, Context(tmp_path / "run"))
    with models.lend(str(tiny_sd)) as pipe:
        pipe.load_lora_weights(result["installed"], adapter_name="star")
        try:
            kwargs = dict(prompt="a sks shape", num_inference_steps=3, output_type="np")
            unfused = pipe(**kwargs, generator=torch.Generator().manual_seed(1)).images
            pipe.fuse_lora()
            fused = pipe(**kwargs, generator=torch.Generator().manual_seed(1)).images
            pipe.unfuse_lora()
        finally:
            pipe.unload_lora_weights()
    assert np.abs(unfused - fused).max() < 1e-4


def test_every_trained_layer_loads_back_at_the_trained_scale(tiny_sd, stars, models, tmp_path):
    """Attention, resnet and feed-forward targets plus the text encoder, α ≠ r: after
    `load_lora_weights` every layer the file holds carries its weights, scaled by α/r."""
    targets = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "ff.net.2")
    s = settings(tiny_sd, stars, rank=2, alpha=6.0, targets=targets, train_text_encoder=True, name="mixed")
    result = trainer.run(s, models, Context(tmp_path / "run"))
    stored = load_file(result["installed"])
    with models.lend(str(tiny_sd)) as pipe:
        pipe.load_lora_weights(result["installed"], adapter_name="mixed")
        try:
            for prefix, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
                wanted = {
                    k[len(prefix) + 1 : -len(".lora_A.weight")]
                    for k in stored
                    if k.startswith(prefix + ".") and k.endswith("lora_A.weight")
                }
                loaded = {
                    name: m
                    for name, m in model.named_modules()
                    if hasattr(m, "lora_A") and "mixed" in m.lora_A
                }
                assert wanted and set(loaded) == wanted
                for name, module in loaded.items():
                    assert torch.equal(
                        module.lora_A["mixed"].weight, stored[f"{prefix}.{name}.lora_A.weight"]
                    )
                    assert module.scaling["mixed"] == pytest.approx(3.0)
        finally:
            pipe.unload_lora_weights()
    assert any("attn1.to_q" in k for k in stored) and any("conv1" in k for k in stored)


def test_a_resumed_run_ends_where_the_straight_one_does(tiny_sd, stars, models, tmp_path):
    straight = trainer.run(
        settings(tiny_sd, stars, steps=6, checkpoint_every=3), models, Context(tmp_path / "a")
    )
    trainer.run(settings(tiny_sd, stars, steps=3, checkpoint_every=3), models, Context(tmp_path / "b"))
    ctx = Context(tmp_path / "b")
    resumed = trainer.run(settings(tiny_sd, stars, steps=6, checkpoint_every=3), models, ctx)

    assert "resumed from step 3" in ctx.messages
    assert resumed["steps"] == straight["steps"] == 6
    a = load_file(tmp_path / "a" / "checkpoints" / "step-000006" / "trainable.safetensors")
    b = load_file(tmp_path / "b" / "checkpoints" / "step-000006" / "trainable.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_of_another_setup_is_refused(tiny_sd, stars, models, tmp_path):
    trainer.run(settings(tiny_sd, stars, steps=2, rank=2), models, Context(tmp_path / "run"))
    with pytest.raises(SettingsError, match="different training setup"):
        trainer.run(settings(tiny_sd, stars, steps=4, rank=4), models, Context(tmp_path / "run"))


def test_textual_inversion_trains_one_small_word_and_leaves_the_rest(tiny_sd, stars, models, tmp_path):
    s = settings(tiny_sd, stars, method="textual-inversion", instance_prompt="a <sks> shape", name="tiny-ti")
    result = trainer.run(s, models, Context(tmp_path / "run"))
    embedding = load_file(result["installed"])
    assert list(embedding) == ["<sks>"] and embedding["<sks>"].shape == (1, 32)
    assert result["output_bytes"] < 10_000
    assert "<sks>" in models.embeddings()

    before = pixels(models, model=str(tiny_sd))
    with_word = pixels(models, model=str(tiny_sd), prompt="a <sks> shape")
    after = pixels(models, model=str(tiny_sd))
    assert with_word.shape == before.shape
    assert np.array_equal(before, after)  # the word came and went with its prompt


def test_dreambooth_saves_a_whole_model_and_caches_class_pictures(tiny_sd, stars, models, tmp_path):
    s = settings(
        tiny_sd,
        stars,
        method="dreambooth",
        steps=2,
        prior_preservation=True,
        class_prompt="a shape",
        class_images=3,
        learning_rate=1e-4,
        name="tiny-db",
    )
    trainer.run(s, models, Context(tmp_path / "one"))
    cached = sorted((models.user_dir / "class-pictures").rglob("*.png"))
    assert len(cached) == 3
    stamps = [p.stat().st_mtime_ns for p in cached]
    trainer.run(s, models, Context(tmp_path / "two"))
    assert [p.stat().st_mtime_ns for p in cached] == stamps  # made once, read after

    assert models.catalog["tiny-db"].kind == "pipeline"
    assert pixels(models, model="tiny-db").shape == (64, 64, 3)


def test_several_class_prompts_make_a_regularisation_set_cycled_through(tiny_sd, stars, models, tmp_path):
    s = settings(
        tiny_sd,
        stars,
        steps=2,
        prior_preservation=True,
        class_prompt="a red circle\n\n  a blue square  \n",
        class_images=3,
    )
    assert s.class_prompts == ("a red circle", "a blue square")
    trainer.run(s, models, Context(tmp_path / "run"))
    (folder,) = (models.user_dir / "class-pictures").iterdir()
    assert (folder / "prompt.txt").read_text().splitlines()[1:] == ["a red circle", "a blue square"]
    assert len(list(folder.glob("*.png"))) == 3

    defaults = models.resolve(str(tiny_sd)).defaults
    with models.lend(str(tiny_sd)) as pipe:  # picture 1 is the base model's "a blue square"
        expected = pipe(
            ["a blue square"],
            num_inference_steps=defaults.get("steps", 25),
            guidance_scale=defaults.get("guidance", 7.5),
            generator=[torch.Generator().manual_seed(1)],
            output_type="np",
        ).images[0]
    stored = np.asarray(Image.open(folder / "0001.png"), dtype=np.int16)
    assert np.abs(stored - np.round(expected * 255).astype(np.int16)).max() <= 1

    many = "\n".join(f"a red circle number {i}" for i in range(250))  # longer than a prompt's 4,000
    assert (
        len(
            settings(
                tiny_sd, stars, prior_preservation=True, class_prompt=many, class_images=250
            ).class_prompts
        )
        == 250
    )
    with pytest.raises(SettingsError, match="2 class prompts but 1 class pictures"):
        settings(tiny_sd, stars, prior_preservation=True, class_prompt=s.class_prompt, class_images=1)


@pytest.mark.parametrize("method", ["lora", "dreambooth"])
def test_the_base_model_prior_target_is_the_untrained_models_prediction(tiny_sd, stars, models, method):
    """The prior term's base-model target comes from the model as it was before training,
    text encoder included, while the model that trains has moved; after the `with` block
    the trained model predicts as before it (LoRA switches its adapters off and back on)."""
    s = settings(
        tiny_sd,
        stars,
        method=method,
        train_text_encoder=True,
        prior_preservation=True,
        class_prompt="a shape",
        prior_target="base-model",
    )
    module = trainer.METHODS[method]
    with models.training_copy(str(tiny_sd)) as pipe:
        ids = pipe.tokenizer(
            ["a red circle on the left"],
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids
        size = pipe.unet.config.sample_size
        zt = torch.randn(
            1, pipe.unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0)
        )

        def predict(unet, text_encoder):
            with torch.no_grad():
                return unet(zt, torch.tensor([500]), encoder_hidden_states=text_encoder(ids)[0]).sample

        untrained = predict(pipe.unet, pipe.text_encoder)
        base = module.frozen_base(pipe, s)
        params, _ = module.prepare(pipe, s)
        with torch.no_grad():  # stands in for training steps: every trainable weight moves
            for p in params:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        trained = predict(pipe.unet, pipe.text_encoder)
        with base() as (unet, text_encoder):
            from_base = predict(unet, text_encoder)
        after = predict(pipe.unet, pipe.text_encoder)
    assert (trained - untrained).abs().max() > 1e-3
    assert torch.allclose(from_base, untrained, atol=1e-6)
    assert torch.equal(after, trained)


@pytest.mark.parametrize("t", [999, 800, 500, 100])
def test_the_base_model_prior_term_counts_an_error_at_least_as_the_clean_latent_error(t):
    """A class view's ε error under the base-model target is weighed as the larger of itself
    and the error it makes in the predicted clean latent x̂_0 (what the layout is made of)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False
    )
    g = torch.Generator().manual_seed(t)
    zt, eps_base, eps_trained = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(3))
    scheduler.set_timesteps(1000)

    def clean(eps):
        return scheduler.step(eps, t, zt).pred_original_sample

    eps_error = ((eps_trained - eps_base) ** 2).mean()
    clean_error = ((clean(eps_trained) - clean(eps_base)) ** 2).mean()
    weighted = trainer._clean_latent_weight(scheduler, torch.tensor([t])) * eps_error
    assert torch.allclose(weighted, torch.maximum(eps_error, clean_error), rtol=1e-4)
    assert (clean_error > eps_error) == (t >= 500)  # SNR(t) < 1 from t = 354 on SD's schedule


def test_settings_saved_before_the_prior_target_existed_keep_the_target_they_trained_with(tiny_sd, stars):
    s = settings(tiny_sd, stars, prior_preservation=True, class_prompt="a shape")
    assert s.prior_target == "base-model"  # the default now
    old = {k: v for k, v in s.to_dict().items() if k != "prior_target"} | {"schema_version": 1}
    assert TrainingSettings.from_dict(old).prior_target == "class-pictures"  # how version 1 trained
    assert TrainingSettings.from_dict(s.to_dict()) == s


def test_a_base_model_prior_run_trains_and_records_its_target(tiny_sd, stars, models, tmp_path):
    s = settings(
        tiny_sd,
        stars,
        prior_preservation=True,
        class_prompt="a shape",
        class_images=2,
        prior_target="base-model",
    )
    result = trainer.run(s, models, Context(tmp_path / "run"))
    assert Path(result["installed"]).is_file() and np.isfinite(result["loss"])
    recorded = json.loads((tmp_path / "run" / "settings.json").read_text())
    assert TrainingSettings.from_dict(recorded).prior_target == "base-model"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"method": "hypernetwork"}, "method must be one of"),
        ({"images": ""}, "no training images"),
        ({"prior_preservation": True, "class_prompt": ""}, "class prompt is empty"),
        ({"method": "textual-inversion", "instance_prompt": "a sks shape"}, "must contain the token"),
        ({"method": "textual-inversion", "token": "two words"}, "one word"),
        ({"targets": ()}, "targets must be"),
        ({"name": "../escape"}, "name may use"),
        ({"steps": 0}, "steps must be between"),
        ({"prior_target": "noise"}, "prior target must be one of base-model, class-pictures"),
        ({"rank": None}, "rank must be a whole number, not empty"),
        (
            {"prior_preservation": True, "class_prompt": "a shape\n" * 2700},
            "class prompt has 21600 characters",
        ),
    ],
)
def test_bad_settings_are_refused_with_a_message(tiny_sd, stars, changes, message):
    with pytest.raises(SettingsError, match=message):
        settings(tiny_sd, stars, **changes)


def test_bad_runs_are_refused_before_training(tiny_sd, stars, models, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "junk.png").write_bytes(b"junk")
    with pytest.raises(SettingsError, match="no readable picture.*junk.png"):
        trainer.run(settings(tiny_sd, empty), models, Context(tmp_path / "r1"))
    with pytest.raises(SettingsError, match="needs a CUDA GPU"):
        trainer.run(settings(tiny_sd, stars, mixed_precision="fp16"), models, Context(tmp_path / "r2"))
    taken = settings(tiny_sd, stars, method="textual-inversion", token="shape", instance_prompt="a shape")
    with pytest.raises(SettingsError, match="already a word"):
        trainer.run(taken, models, Context(tmp_path / "r3"))
    with pytest.raises(SettingsError, match="match no layer"):
        trainer.run(settings(tiny_sd, stars, targets=("no_such_layer",)), models, Context(tmp_path / "r4"))


# ---------------------------------------------------------------------------- as a job


def poll(studio, job, until, timeout=120.0):
    import time

    deadline = time.monotonic() + timeout
    while not until(state := studio.jobs.get(job)):
        assert time.monotonic() < deadline, f"job #{job} stuck at {state.status} step {state.step}"
        time.sleep(0.05)
    return state


def test_a_cancelled_job_keeps_its_checkpoint_and_a_new_job_resumes_it(tiny_sd, stars, studio):
    long = settings(tiny_sd, stars, steps=5000, checkpoint_every=5000, sample_every=5000)
    job = studio.start_training(long)
    running = poll(studio, job, lambda s: s.step > 0)
    assert running.status == "running" and running.metrics and "loss" in running.metrics[-1]
    studio.jobs.cancel(job)
    stopped = studio.jobs.wait(job, timeout=60)
    assert stopped.status == "cancelled"
    checkpoints = sorted((Path(stopped.out_dir) / "checkpoints").glob("step-*"))
    assert checkpoints, "a cancelled run writes a checkpoint to resume from"
    at = int(checkpoints[-1].name.split("-")[1])

    more = studio.start_training(long.replace(steps=at + 2), out_dir=Path(stopped.out_dir))
    done = studio.jobs.wait(more, timeout=120)
    assert done.status == "done", done.error
    assert done.result["steps"] == at + 2
    assert done.settings["method"] == "lora"  # the gallery database keeps what trained it
    assert Path(done.result["installed"]).is_file()
    with pytest.raises(SettingsError, match="only a stopped run"):
        studio.resume_training(more)


def test_a_failing_training_job_says_why_in_one_line(tiny_sd, stars, studio):
    job = studio.start_training(settings(tiny_sd, stars, targets=("no_such_layer",)))
    state = studio.jobs.wait(job, timeout=60)
    assert state.status == "failed"
    assert "match no layer" in state.error and "\n" not in state.error


# ---------------------------------------------------------------------------- the command line


def test_the_train_command_trains_resumes_and_refuses_in_one_line(tiny_sd, stars, tmp_path):
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "studio", "train", *map(str, args), "--data-dir", tmp_path / "data"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
        )

    run = tmp_path / "run"
    first = cli(
        "--model",
        tiny_sd,
        "--images",
        stars,
        "--steps",
        3,
        "--checkpoint-every",
        3,
        "--name",
        "cli-star",
        "--prior-preservation",
        "--class-prompt",
        "a shape",
        "--class-prompt",
        "two red circles",
        "--class-images",
        2,
        "--prior-target",
        "base-model",
        "--out",
        run,
    )
    assert first.returncode == 0, first.stderr
    assert '"prior_target": "base-model"' in (run / "settings.json").read_text()
    assert "cli-star.safetensors" in first.stdout
    (made,) = (tmp_path / "data" / "library" / "class-pictures").iterdir()
    assert (made / "prompt.txt").read_text().splitlines()[1:] == ["a shape", "two red circles"]
    assert (tmp_path / "data" / "library" / "loras" / "cli-star.safetensors").is_file()

    more = cli("--resume", run, "--steps", 5)
    assert more.returncode == 0, more.stderr
    assert "5 steps" in more.stdout
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-000003", "step-000005"]

    bad = cli("--method", "hypernetwork", "--images", stars, "--out", tmp_path / "x")
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "method must be one of" in bad.stderr
    nowhere = cli("--images", tmp_path / "missing", "--out", tmp_path / "y")
    assert nowhere.returncode == 2 and "is not a folder" in nowhere.stderr


def test_a_text_encoder_lora_is_saved_and_applied_by_txt2img(tiny_sd, stars, models, tmp_path):
    s = settings(tiny_sd, stars, train_text_encoder=True, name="tiny-text")
    result = trainer.run(s, models, Context(tmp_path / "run"))
    keys = load_file(result["installed"])
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("unet.") for k in keys)
    with models.lend(str(tiny_sd), loras=(LoraRef("tiny-text", 1.0),)) as pipe:
        assert any("lora" in name for name, _ in pipe.text_encoder.named_modules())
    before = pixels(models, model=str(tiny_sd))
    with_lora = pixels(models, model=str(tiny_sd), loras=(LoraRef("tiny-text", 1.0),))
    assert not np.array_equal(before, with_lora)
    assert np.array_equal(before, pixels(models, model=str(tiny_sd)))


def test_a_lora_trains_on_top_of_a_learned_word(tiny_sd, stars, models, tmp_path):
    word = settings(
        tiny_sd, stars, method="textual-inversion", instance_prompt="a <sks> shape", name="tiny-word"
    )
    trainer.run(word, models, Context(tmp_path / "word"))
    ctx = Context(tmp_path / "lora")
    result = trainer.run(
        settings(tiny_sd, stars, instance_prompt="a <sks> shape", name="on-word"), models, ctx
    )
    assert "trained words loaded: tiny-word" in ctx.messages
    both = pixels(models, model=str(tiny_sd), prompt="a <sks> shape", loras=(LoraRef("on-word", 1.0),))
    assert both.shape == (64, 64, 3) and Path(result["installed"]).is_file()
