"""SDEdit and InstructPix2Pix on tiny pipelines: step counts, guidance branches, bit-identity
with diffusers, input images, refusals, and the gallery lineage of edits."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import denoiser_batches
from PIL import Image

from studio import ip2p, sdedit
from studio.images import ImageInputError, fit_to_grid, open_image
from studio.models import ModelError
from studio.progress import Cancelled
from studio.registry import settings_from_dict
from studio.settings import SettingsError
from studio.toyworld.captions import CaptionSpec, ObjectSpec, sample_scene
from studio.toyworld.render import render

PROMPT = "a blue circle in the center"


@pytest.fixture(scope="module")
def source() -> Image.Image:
    import random

    spec = CaptionSpec((ObjectSpec("red", "circle", "large", "in the center"),), background="white")
    return render(sample_scene(spec, random.Random(0)))


def edit_settings(model, **kw) -> sdedit.SDEditSettings:
    base = dict(prompt=PROMPT, model=str(model), seed=3, steps=10, guidance=5.0, strength=0.6)
    base.update(kw)
    return sdedit.SDEditSettings(**base)


def ip2p_settings(model, **kw) -> ip2p.InstructPix2PixSettings:
    base = dict(instruction="make the circle blue", model=str(model), seed=3, steps=6, guidance=5.0)
    base.update(kw, image_guidance=kw.get("image_guidance", 1.5))
    return ip2p.InstructPix2PixSettings(**base)


# ---------------------------------------------------------------- input images


def png_bytes(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **kw)
    return buf.getvalue()


def test_exif_orientation_is_honoured():
    wide = Image.new("RGB", (40, 24), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    buf = io.BytesIO()
    wide.save(buf, format="JPEG", exif=exif)
    assert open_image(buf.getvalue()).size == (24, 40)


def test_transparency_is_flattened_over_white():
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    assert open_image(png_bytes(rgba)).getpixel((3, 3)) == (255, 255, 255)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"not an image at all", "not a readable image"),
        (png_bytes(Image.new("RGB", (8, 8)))[:40], "not a readable image"),
    ],
)
def test_bad_input_images_are_refused(data, message):
    with pytest.raises(ImageInputError, match=message):
        open_image(data)


def test_huge_images_are_refused_before_decoding():
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    bomb = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )
    with pytest.raises(ImageInputError, match="too large"):
        open_image(bomb)


def test_fitting_to_the_latent_grid_says_what_it_did():
    image = Image.new("RGB", (100, 90))
    cropped = fit_to_grid(image, "crop")
    assert cropped.image.size == (96, 88) and "cropped 100×90 to 96×88" in cropped.note
    resized = fit_to_grid(Image.new("RGB", (102, 90)), "resize")
    assert resized.image.size == (104, 88) and "resized 102×90 to 104×88" in resized.note
    assert fit_to_grid(Image.new("RGB", (64, 64))).note == "kept at 64×64"
    with pytest.raises(ImageInputError, match="too small"):
        fit_to_grid(Image.new("RGB", (5, 64)))
    with pytest.raises(ImageInputError, match="too large"):
        fit_to_grid(Image.new("RGB", (4000, 64)))


# ---------------------------------------------------------------- SDEdit


@pytest.mark.parametrize(
    "strength, steps, runs", [(0.6, 10, 6), (0.01, 10, 1), (0.55, 10, 6), (0.99, 10, 10)]
)
def test_sdedit_runs_the_last_ceil_of_steps_times_strength(tiny_sd, manager, source, strength, steps, runs):
    with denoiser_batches(manager, tiny_sd) as calls:
        result = sdedit.run(edit_settings(tiny_sd, strength=strength, steps=steps), source, manager)
    assert calls == [2] * runs  # classifier-free guidance: one batched forward a step
    assert f"{runs} of {steps} steps run" in " ".join(result.notes)


def test_sdedit_equals_diffusers_img2img(tiny_sd, manager, source):
    from diffusers import StableDiffusionImg2ImgPipeline

    ours = sdedit.run(edit_settings(tiny_sd, scheduler="DDIM"), source, manager).images[0]
    bare = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_sd, dtype=torch.float32)
    theirs = bare(
        PROMPT,
        image=source,
        strength=0.6,
        num_inference_steps=10,
        guidance_scale=5.0,
        generator=[torch.Generator("cpu").manual_seed(3)],
    ).images[0]
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_sdedit_strength_zero_returns_the_input_and_says_so(tiny_sd, manager, source):
    with denoiser_batches(manager, tiny_sd) as calls:
        result = sdedit.run(edit_settings(tiny_sd, strength=0.0), source, manager)
    assert calls == []
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(source))
    assert any("unchanged" in n for n in result.notes)


def test_sdedit_strength_one_is_text_to_image(tiny_sd, manager, source):
    from studio.txt2img import Txt2ImgSettings, run

    edited = sdedit.run(edit_settings(tiny_sd, strength=1.0, scheduler="DDIM"), source, manager).images[0]
    t2i = Txt2ImgSettings(prompt=PROMPT, model=str(tiny_sd), seed=3, steps=10, guidance=5.0, scheduler="DDIM")
    made = run(t2i, manager).images[0]
    assert np.array_equal(np.asarray(edited), np.asarray(made))


def test_sdedit_on_a_flow_matching_model(tiny_sd3, manager, source):
    with denoiser_batches(manager, tiny_sd3) as calls:
        result = sdedit.run(edit_settings(tiny_sd3, strength=0.5, steps=8, shift=3.0), source, manager)
    assert len(calls) == 4 and result.family == "sd3"
    assert result.images[0].size == source.size


def test_sdedit_on_sdxl_runs_the_same_step_count(tiny_sdxl, manager, source):
    with denoiser_batches(manager, tiny_sdxl) as calls:
        result = sdedit.run(edit_settings(tiny_sdxl, strength=0.35, steps=10), source, manager)
    assert calls == [2] * 4 and result.family == "sdxl"


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"strength": 1.5}, "strength must be between 0.0 and 1.0"),
        ({"strength": -0.1}, "strength must be between 0.0 and 1.0"),
        ({"fit": "stretch"}, "fit must be one of"),
        ({"prompt": " "}, "prompt is empty"),
        ({"refiner": "sdxl-refiner"}, "no refiner"),
    ],
)
def test_sdedit_bad_settings(kw, message):
    with pytest.raises(SettingsError, match=message):
        edit_settings("toy-sd", **kw)


# ---------------------------------------------------------------- InstructPix2Pix


def test_ip2p_is_three_branches_in_one_forward_and_equals_diffusers(tiny_ip2p, manager, source):
    from diffusers import StableDiffusionInstructPix2PixPipeline

    with denoiser_batches(manager, tiny_ip2p) as calls:
        ours = ip2p.run(ip2p_settings(tiny_ip2p, scheduler="DDIM"), source, manager).images[0]
    assert calls == [3] * 6
    bare = StableDiffusionInstructPix2PixPipeline.from_pretrained(tiny_ip2p, dtype=torch.float32)
    theirs = bare(
        "make the circle blue",
        image=source,
        num_inference_steps=6,
        guidance_scale=5.0,
        image_guidance_scale=1.5,
        generator=[torch.Generator("cpu").manual_seed(3)],
    ).images[0]
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_ip2p_both_guidance_scales_matter(tiny_ip2p, manager, source):
    base = np.asarray(ip2p.run(ip2p_settings(tiny_ip2p), source, manager).images[0], dtype=float)
    text = np.asarray(
        ip2p.run(ip2p_settings(tiny_ip2p, guidance=9.0), source, manager).images[0], dtype=float
    )
    image = np.asarray(
        ip2p.run(ip2p_settings(tiny_ip2p, image_guidance=3.0), source, manager).images[0], dtype=float
    )
    assert np.abs(base - text).mean() > 0.5 and np.abs(base - image).mean() > 0.5


def test_ip2p_without_guidance_is_a_single_branch(tiny_ip2p, manager, source):
    with denoiser_batches(manager, tiny_ip2p) as calls:
        ip2p.run(ip2p_settings(tiny_ip2p, guidance=1.0, image_guidance=1.0), source, manager)
    assert calls == [1] * 6


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"guidance": 1.0, "image_guidance": 2.0}, "turns guidance off"),
        ({"guidance": 5.0, "image_guidance": 0.5}, "image guidance must be at least 1"),
        ({"instruction": ""}, "instruction is empty"),
        ({"image_guidance": 11.0}, "image guidance must be between"),
    ],
)
def test_ip2p_bad_settings(kw, message):
    with pytest.raises(SettingsError, match=message):
        ip2p_settings("toy-instruct-pix2pix", **kw)


def test_ip2p_refuses_a_model_that_is_not_instruct_pix2pix(tiny_sd, tiny_ip2p, manager, source):
    with pytest.raises(ModelError, match="not an InstructPix2Pix model.*4 input channels"):
        ip2p.run(ip2p_settings(tiny_sd), source, manager)
    from studio.txt2img import Txt2ImgSettings, run

    with pytest.raises(ModelError, match="is an InstructPix2Pix model"):
        run(Txt2ImgSettings(prompt=PROMPT, model=str(tiny_ip2p), steps=2), manager)


def test_edit_settings_round_trip_through_the_registry(tiny_ip2p):
    for s in (edit_settings("toy-sd", source_id=4, fit="resize"), ip2p_settings(tiny_ip2p, source_id=9)):
        assert settings_from_dict(s.to_dict()) == s


# ---------------------------------------------------------------- the studio: gallery lineage


def test_an_upload_becomes_the_parent_and_lineage_walks_both_ways(tiny_sd, studio, source):
    result, items = studio.sdedit(edit_settings(tiny_sd), png_bytes(source))
    (item,) = items
    parent = studio.gallery.get(item.parent_id)
    assert parent.technique == "upload" and item.settings["source_id"] == parent.id
    ancestors, descendants = studio.gallery.lineage(item.id)
    assert [a.id for a in ancestors] == [parent.id]
    assert [d.id for d in studio.gallery.lineage(parent.id)[1]] == [item.id]
    # Editing the edit from the gallery chains the history; no new upload is stored.
    _, (child,) = studio.sdedit(edit_settings(tiny_sd, source_id=item.id))
    assert child.parent_id == item.id
    assert studio.gallery.count() == 3
    assert [a.id for a in studio.gallery.lineage(child.id)[0]] == [parent.id, item.id]  # root first


def test_a_different_picture_than_the_named_source_is_a_new_upload(tiny_sd, studio, source):
    _, (first,) = studio.sdedit(edit_settings(tiny_sd), source)
    other = Image.new("RGB", (64, 64), (0, 0, 0))
    _, (second,) = studio.sdedit(edit_settings(tiny_sd, source_id=first.id), other)
    assert second.parent_id not in (first.id, first.parent_id)
    assert studio.gallery.get(second.parent_id).technique == "upload"


def test_ip2p_results_are_stored_with_their_parent(tiny_ip2p, studio, source):
    result, (item,) = studio.ip2p(ip2p_settings(tiny_ip2p), source)
    assert item.technique == "ip2p" and item.prompt == "make the circle blue"
    assert "Image CFG scale: 1.5" in Image.open(item.image_path).info["parameters"]
    assert studio.gallery.get(item.parent_id).technique == "upload"
    assert settings_from_dict(item.settings) == result.image_settings(0)


@pytest.mark.parametrize("case", ["cancel", "strength zero", "no image", "bad model"])
def test_nothing_is_stored_when_an_edit_makes_nothing(tiny_sd, studio, source, case):
    before = studio.gallery.count()
    if case == "cancel":

        def on_step(step):
            raise Cancelled()

        with pytest.raises(Cancelled):
            studio.sdedit(edit_settings(tiny_sd), source, on_step=on_step)
    elif case == "strength zero":
        result, items = studio.sdedit(edit_settings(tiny_sd, strength=0.0), source)
        assert items == [] and result.images
    elif case == "no image":
        with pytest.raises(SettingsError, match="no input image"):
            studio.sdedit(edit_settings(tiny_sd), None)
    else:
        with pytest.raises(ModelError):
            studio.ip2p(ip2p_settings(tiny_sd), source)
    assert studio.gallery.count() == before
