"""The shipped toy models: standard loaders, offline, reproducible, and judged on simple prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ROOT

MODELS = ROOT / "assets" / "models"
SIMPLE_PROMPTS = [
    "a red circle",
    "a blue square",
    "a green triangle",
    "a yellow circle",
    "a purple square",
    "a orange triangle",
    "a red square on a black background",
    "a blue circle on a white background",
    "a green square on a gray background",
    "a yellow triangle on a black background",
]


def test_toy_clip_loads_with_transformers():
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(MODELS / "toy-clip")
    tokenizer = CLIPTokenizer.from_pretrained(MODELS / "toy-clip")
    assert (MODELS / "toy-clip" / "vocab.json").exists() and (MODELS / "toy-clip" / "merges.txt").exists()
    ids = tokenizer(["a red circle to the left of a blue square"]).input_ids[0]
    assert len(ids) == 12  # ten words, one token each, plus start and end
    assert model.config.text_config.vocab_size == len(tokenizer)


def test_toy_vae_round_trips_a_render():
    import random

    from diffusers import AutoencoderKL

    from studio.toyworld.captions import sample_pair
    from studio.toyworld.render import render
    from studio.toyworld.train.common import images_to_tensor

    vae = AutoencoderKL.from_pretrained(MODELS / "toy-vae").eval()
    _, scene = sample_pair(random.Random(0))
    x = images_to_tensor([render(scene)])
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        y = vae.decode(z).sample
    assert z.shape == (1, 4, 8, 8)
    mse = torch.mean(((y.clamp(-1, 1) - x) / 2) ** 2).item()
    assert 10 * np.log10(1 / mse) > 30  # dB; the card reports the held-out figure (34)


@pytest.mark.skipif(not (MODELS / "toy-sd" / "model_index.json").exists(), reason="toy-sd not trained yet")
def test_toy_sd_loads_offline_and_is_reproducible():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        MODELS / "toy-sd", dtype=torch.float32, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)

    def sample(seed):
        return pipe(
            "a red circle", num_inference_steps=10, generator=torch.Generator().manual_seed(seed)
        ).images[0]

    a, b = sample(1), sample(1)
    assert a.size == (64, 64)
    assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.skipif(not (MODELS / "toy-sd" / "model_index.json").exists(), reason="toy-sd not trained yet")
def test_toy_sd_draws_simple_prompts(manager):
    """toy-sd at its catalog defaults, judged: see the model card for the full toy GenEval."""
    from studio.toyworld.judge import satisfies
    from studio.txt2img import Txt2ImgSettings, run

    ok = 0
    for i, prompt in enumerate(SIMPLE_PROMPTS):
        image = run(Txt2ImgSettings(prompt=prompt, model="toy-sd", seed=i), manager).images[0]
        ok += satisfies(image, prompt)
    assert ok >= TOY_SD_SIMPLE_BAR, f"{ok}/10 simple prompts drawn right"


TOY_SD_SIMPLE_BAR = 8  # the bar; measured 10/10 at training time


TOY_IP2P = MODELS / "toy-instruct-pix2pix"
IP2P_GUARD = 0.6  # measured 0.78 on 100 held-out edits; the bar (0.8) is not yet reached


@pytest.mark.skipif(
    not (TOY_IP2P / "model_index.json").exists(), reason="toy-instruct-pix2pix not trained yet"
)
def test_toy_instruct_pix2pix_loads_offline_with_its_pipeline():
    from diffusers import StableDiffusionInstructPix2PixPipeline

    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(TOY_IP2P, local_files_only=True)
    assert pipe.unet.config.in_channels == 8


def test_catalog_defaults_are_the_ones_the_cards_were_scored_with():
    """The catalog's sampling defaults (what the tabs start from) match the stages' constants
    that each shipped card's scores were measured at."""
    from studio.models import load_catalog
    from studio.toyworld.train import ip2p, sd

    catalog = load_catalog()
    assert catalog["toy-sd"].defaults["guidance"] == sd.DEFAULT_GUIDANCE
    pix2pix = catalog["toy-instruct-pix2pix"].defaults
    assert (pix2pix["guidance"], pix2pix["image_guidance"]) == (ip2p.GUIDANCE, ip2p.IMAGE_GUIDANCE)


@pytest.mark.skipif(
    not (TOY_IP2P / "model_index.json").exists(), reason="toy-instruct-pix2pix not trained yet"
)
def test_toy_instruct_pix2pix_follows_held_out_edits(manager):
    """20 held-out edits (bench/bench_editing.py runs 100): named change made, the rest kept."""
    from studio.toyworld.edit_eval import instruct_pix2pix_score

    report = instruct_pix2pix_score(manager, "toy-instruct-pix2pix", n=20)
    assert report["overall"] >= IP2P_GUARD, report


@pytest.mark.skipif(not (MODELS / "toy-sd" / "model_index.json").exists(), reason="toy-sd not trained yet")
def test_sdedit_recolours_by_prompt_and_keeps_the_layout(manager):
    """SDEdit at strength 0.6 on toy-sd: the new colour, the centre moved ≤ 4 px."""
    from studio.toyworld.edit_eval import sdedit_recolour

    report = sdedit_recolour(manager, "toy-sd", 0.6, n=20)
    assert report["success"] >= SDEDIT_BAR, report
    # the sweep's two ends: strength 0 keeps everything and recolours nothing
    assert sdedit_recolour(manager, "toy-sd", 0.0, n=10)["kept_layout"] >= 0.9


SDEDIT_BAR = 0.6  # 20 samples (measured 0.75 on 40); bench/bench_editing.py measures 100


TOY_SD3 = MODELS / "toy-sd3"


@pytest.mark.skipif(not (TOY_SD3 / "model_index.json").exists(), reason="toy-sd3 not trained yet")
def test_toy_sd3_loads_offline_without_t5_and_is_reproducible():
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(
        TOY_SD3, local_files_only=True, dtype=torch.float32, text_encoder_3=None, tokenizer_3=None
    )
    assert pipe.text_encoder_3 is None and pipe.vae.config.shift_factor is not None
    images = [
        np.asarray(
            pipe("a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(3)).images[0]
        )
        for _ in range(2)
    ]
    assert np.array_equal(images[0], images[1])


@pytest.mark.skipif(not (TOY_SD3 / "model_index.json").exists(), reason="toy-sd3 not trained yet")
def test_toy_sd3_draws_simple_prompts(manager):
    from studio.toyworld.judge import satisfies
    from studio.txt2img import Txt2ImgSettings, run

    ok = 0
    for i, prompt in enumerate(SIMPLE_PROMPTS):
        image = run(Txt2ImgSettings(prompt=prompt, model="toy-sd3", seed=i), manager).images[0]
        ok += satisfies(image, prompt)
    assert ok >= TOY_SD_SIMPLE_BAR, f"{ok}/10 simple prompts drawn right"


CONTROLNET_GUARD = 0.6  # 10 held-out scenes; bench/bench_controlnet.py runs 100 (see the model card)


@pytest.mark.parametrize("kind", ["canny", "seg"])
def test_toy_controlnets_keep_held_out_structure(manager, kind):
    """Canny / segmentation map of a held-out scene + its caption: same shapes, IoU ≥ 0.7."""
    from diffusers import ControlNetModel

    from studio.toyworld.control_eval import controlnet_score

    if not (MODELS / f"toy-sd-controlnet-{kind}" / "config.json").exists():
        pytest.skip(f"toy-sd-controlnet-{kind} not trained yet")
    ControlNetModel.from_pretrained(MODELS / f"toy-sd-controlnet-{kind}", local_files_only=True)
    report = controlnet_score(manager, "toy-sd", f"toy-sd-controlnet-{kind}", kind, n=10)
    assert report["controlnet"]["kept"] >= CONTROLNET_GUARD, report
    assert report["controlnet"]["kept"] > report["without_controlnet"]["kept"], report
