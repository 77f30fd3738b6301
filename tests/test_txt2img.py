"""txt2img on tiny pipelines: bit-identity with diffusers, one batched CFG forward, cancel, seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import denoiser_batches

from studio.progress import Cancelled
from studio.settings import SettingsError
from studio.txt2img import Txt2ImgSettings, run


def settings(model, **kw):
    base = dict(
        prompt="a red circle on the left",
        model=str(model),
        seed=7,
        steps=4,
        guidance=5.0,
        width=64,
        height=64,
    )
    base.update(kw)
    return Txt2ImgSettings(**base)


@pytest.mark.parametrize("scheduler", ["DDIM", "Euler a", "DPM++ 2M Karras"])
def test_same_image_as_the_bare_pipeline(tiny_sd, manager, scheduler):
    from diffusers import StableDiffusionPipeline

    from studio.schedulers import make_scheduler

    ours = run(settings(tiny_sd, scheduler=scheduler, negative_prompt="blue"), manager).images[0]
    bare = StableDiffusionPipeline.from_pretrained(tiny_sd, dtype=torch.float32)
    bare.scheduler = make_scheduler(scheduler, "sd", bare.scheduler.config)
    theirs = bare(
        "a red circle on the left",
        negative_prompt="blue",
        num_inference_steps=4,
        guidance_scale=5.0,
        width=64,
        height=64,
        generator=[torch.Generator("cpu").manual_seed(7)],
    ).images[0]
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_sd3_same_image_as_the_bare_pipeline(tiny_sd3, manager):
    from diffusers import StableDiffusion3Pipeline

    ours = run(settings(tiny_sd3, scheduler="Flow Euler"), manager).images[0]
    bare = StableDiffusion3Pipeline.from_pretrained(
        tiny_sd3, dtype=torch.float32, text_encoder_3=None, tokenizer_3=None
    )
    theirs = bare(
        "a red circle on the left",
        num_inference_steps=4,
        guidance_scale=5.0,
        width=64,
        height=64,
        generator=[torch.Generator("cpu").manual_seed(7)],
    ).images[0]
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def _count_unet_calls(manager, model, s):
    with denoiser_batches(manager, model) as calls:
        run(s, manager)
    return calls


def test_guidance_is_one_batched_forward_per_step(tiny_sd, manager):
    calls = _count_unet_calls(manager, tiny_sd, settings(tiny_sd, steps=5, guidance=5.0, batch_size=2))
    assert calls == [4] * 5  # [uncond x2, cond x2] in one forward, once a step


def test_guidance_one_runs_a_single_branch(tiny_sd, manager):
    calls = _count_unet_calls(manager, tiny_sd, settings(tiny_sd, steps=5, guidance=1.0))
    assert calls == [1] * 5


def test_seed_is_drawn_recorded_and_reproduces(tiny_sd, manager):
    first = run(settings(tiny_sd, seed=None), manager)
    assert first.settings.seed is not None and first.seeds == [first.settings.seed]
    again = run(first.image_settings(0), manager)
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(again.images[0]))


def test_batches_use_consecutive_seeds(tiny_sd, manager):
    r = run(settings(tiny_sd, batch_size=2, batch_count=2, seed=100), manager)
    assert r.seeds == [100, 101, 102, 103] and len(r.images) == 4
    single = run(r.image_settings(3), manager).images[0]
    diff = np.abs(np.asarray(single, dtype=int) - np.asarray(r.images[3], dtype=int)).max()
    assert diff <= 2  # batched matmuls may round differently in the last bit


def test_cancel_stops_within_one_step_and_stores_nothing(tiny_sd, studio):
    seen = []

    def on_step(info):
        seen.append(info.step)
        if info.step == 2:
            raise Cancelled()

    with pytest.raises(Cancelled):
        studio.txt2img(settings(tiny_sd, steps=10), on_step=on_step)
    assert seen == [1, 2]
    assert studio.gallery.count() == 0
    assert not any(studio.paths.images.glob("*.png"))


def test_generation_is_stored_with_settings_that_remake_it(tiny_sd, studio):
    from studio.pngmeta import parse_infotext, read_png

    result, items = studio.txt2img(settings(tiny_sd, seed=None))
    item = items[0]
    assert item.seed == result.seeds[0] and item.technique == "txt2img"
    restored = Txt2ImgSettings.from_dict(item.settings)
    assert restored == result.image_settings(0)
    meta = read_png(item.image_path)
    assert meta.settings == item.settings
    info = parse_infotext(meta.infotext)
    assert info["prompt"] == "a red circle on the left" and info["Seed"] == item.seed and info["Steps"] == 4


def test_prompt_weighting_changes_the_conditioning(tiny_sd, manager):
    plain = run(settings(tiny_sd, prompt="a red circle"), manager).images[0]
    weighted = run(settings(tiny_sd, prompt="a (red:1.8) circle"), manager).images[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(weighted))


def test_previews_reach_on_step(tiny_sd, studio):
    previews = []
    spec = studio.models.resolve(str(tiny_sd))
    studio.txt2img(
        settings(tiny_sd, steps=3),
        on_step=lambda info: previews.append(studio.preview(info.latents, spec)),
        store=False,
    )
    assert len(previews) == 3 and previews[0].size == (64, 64)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(prompt=""), "prompt is empty"),
        (dict(prompt="x" * 10_000), "limit is"),
        (dict(width=7), "between 8"),
        (dict(width=100000), "between 8"),
        (dict(width=100), "multiple of 8"),
        (dict(steps=0), "steps"),
        (dict(steps=-1), "steps"),
        (dict(guidance=float("nan")), "finite"),
        (dict(seed=-5), "seed"),
    ],
)
def test_bad_settings_get_a_clear_message(tiny_sd, kw, message):
    with pytest.raises(SettingsError, match=message):
        settings(tiny_sd, **kw)


def test_family_checks(tiny_sd, tiny_sd3, manager):
    with pytest.raises(SettingsError, match="does not work with sd"):
        run(settings(tiny_sd, scheduler="Flow Euler"), manager)
    with pytest.raises(SettingsError, match="unknown scheduler"):
        run(settings(tiny_sd, scheduler="Bogus"), manager)
    with pytest.raises(SettingsError, match="SDXL"):
        run(settings(tiny_sd, original_size=(1024, 1024)), manager)
    with pytest.raises(SettingsError, match="shift"):
        run(settings(tiny_sd, shift=3.0), manager)
    r = run(settings(tiny_sd3, scheduler="Flow Euler", shift=1.0), manager)
    assert r.family == "sd3"


def test_sdxl_micro_conditioning_reaches_the_unet_and_matches_diffusers(tiny_sdxl, manager):
    from diffusers import StableDiffusionXLPipeline

    s = settings(
        tiny_sdxl, scheduler="Euler", original_size=(512, 512), crop_top_left=(16, 0), target_size=(64, 64)
    )
    ours = run(s, manager).images[0]
    bare = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, dtype=torch.float32)
    theirs = bare(
        "a red circle on the left",
        num_inference_steps=4,
        guidance_scale=5.0,
        width=64,
        height=64,
        original_size=(512, 512),
        crops_coords_top_left=(16, 0),
        target_size=(64, 64),
        generator=[torch.Generator("cpu").manual_seed(7)],
    ).images[0]
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    plain = run(settings(tiny_sdxl, scheduler="Euler"), manager).images[0]
    assert not np.array_equal(np.asarray(ours), np.asarray(plain))


def test_sdxl_refiner_takes_over_the_last_steps(tiny_sdxl, manager):
    with denoiser_batches(manager, tiny_sdxl) as calls:
        r = run(
            settings(tiny_sdxl, scheduler="Euler", steps=10, refiner=str(tiny_sdxl), refiner_fraction=0.6),
            manager,
        )
    assert r.images[0].size == (64, 64)
    assert len(calls) == 10  # 6 base steps + 4 refiner steps, one batched forward each


def test_sdxl_prompt_weighting(tiny_sdxl, manager):
    plain = run(settings(tiny_sdxl, scheduler="Euler", prompt="a red circle"), manager).images[0]
    weighted = run(settings(tiny_sdxl, scheduler="Euler", prompt="a (red:1.8) circle"), manager).images[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(weighted))
