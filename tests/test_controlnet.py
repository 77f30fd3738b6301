"""ControlNet / T2I-Adapter: the maps, the units, the refusals, the gallery and the CLI."""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

from studio import preprocessors
from studio.controlnet import ControlNetSettings, ControlUnit, run
from studio.models import ModelError, ModelManager
from studio.registry import settings_from_dict
from studio.settings import SettingsError
from studio.toyworld.captions import sample_pair
from studio.toyworld.render import canny_map, render, segmentation_map
from studio.txt2img import Txt2ImgSettings
from studio.txt2img import run as txt2img


@pytest.fixture(scope="module")
def fresh_controlnet(tmp_path_factory, tiny_sd):
    from tiny_models import build_tiny_controlnet

    return build_tiny_controlnet(tmp_path_factory.mktemp("models") / "fresh-cn", tiny_sd, trained=False)


@pytest.fixture(scope="module")
def sdxl_controlnet(tmp_path_factory, tiny_sdxl):
    from tiny_models import build_tiny_controlnet

    return build_tiny_controlnet(tmp_path_factory.mktemp("models") / "sdxl-cn", tiny_sdxl)


@pytest.fixture(scope="module")
def scene_picture():
    return render(sample_pair(random.Random(7))[1])


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def settings(model, units, **changes) -> ControlNetSettings:
    base = dict(prompt="a red circle on the left", model=str(model), seed=3, steps=3)
    base.update(changes)
    return ControlNetSettings(units=tuple(units), **base)


def unit(model, **changes) -> ControlUnit:
    return ControlUnit(model=str(model), **{"preprocessor": "canny", **changes})


# --------------------------------------------------------------------------- preprocessors


def test_canny_and_palette_segmentation_are_the_toy_worlds_maps(scene_picture):
    scene = sample_pair(random.Random(7))[1]
    assert np.array_equal(  # the preprocessor's defaults are A1111's, for photographs
        pixels(preprocessors.preprocess("canny", scene_picture)), pixels(canny_map(scene_picture, 100, 200))
    )
    assert np.array_equal(  # the world's own thresholds
        pixels(preprocessors.preprocess("canny", scene_picture, a=15, b=30)), pixels(canny_map(scene_picture))
    )
    seg = pixels(preprocessors.preprocess("segmentation_palette", scene_picture))
    assert (seg != pixels(segmentation_map(scene))).any(-1).mean() < 0.02  # anti-aliased rims only


def test_the_toy_canny_controlnet_brings_the_thresholds_its_maps_were_made_with():
    from studio.controlnet import ControlUnit, catalog_thresholds

    models = ModelManager()
    toy = catalog_thresholds(models, ControlUnit(model="toy-sd-controlnet-canny", preprocessor="canny"))
    assert (toy.threshold_a, toy.threshold_b) == (15, 30)
    mine = ControlUnit(
        model="toy-sd-controlnet-canny", preprocessor="canny", threshold_a=50, threshold_b=None
    )
    assert (catalog_thresholds(models, mine).threshold_a, catalog_thresholds(models, mine).threshold_b) == (
        50,
        30,
    )
    other = ControlUnit(model="toy-sd-controlnet-canny", preprocessor="lineart_standard")
    assert catalog_thresholds(models, other) == other  # thresholds of another preprocessor: its own
    real = ControlUnit(model="controlnet-canny-sd15", preprocessor="canny")
    assert catalog_thresholds(models, real) == real  # photographs: A1111's 100/200


def test_weightless_preprocessors_run_offline(scene_picture):
    for name in ("none", "shuffle", "lineart_standard"):
        assert preprocessors.preprocess(name, scene_picture).size == scene_picture.size


def test_missing_weights_and_packages_are_named(scene_picture, tmp_path, monkeypatch):
    monkeypatch.setenv("LATENT_STUDIO_ANNOTATORS", str(tmp_path))
    with pytest.raises(
        ModelError, match=f"needs ControlNetHED.safetensors in {tmp_path}.*lllyasviel/Annotators"
    ):
        preprocessors.preprocess("hed", scene_picture)
    with pytest.raises(ModelError, match="needs sk_model.safetensors"):
        preprocessors.preprocess("lineart", scene_picture)


def test_a_converted_annotator_loads_from_safetensors(scene_picture, tmp_path, monkeypatch):
    """The published HED pickle's format, made here: converted with weights_only, then loaded."""
    import torch
    from controlnet_aux.hed import ControlNetHED_Apache2

    torch.save(ControlNetHED_Apache2().state_dict(), tmp_path / "ControlNetHED.pth")
    monkeypatch.setenv("LATENT_STUDIO_ANNOTATORS", str(tmp_path / "annotators"))
    target = preprocessors.convert_annotator(tmp_path / "ControlNetHED.pth")
    assert target == tmp_path / "annotators" / "ControlNetHED.safetensors"
    assert preprocessors.preprocess("hed", scene_picture).size == scene_picture.size


class Payload:
    """Not a tensor: torch.load(weights_only=True) refuses to build it."""


def test_a_pickle_with_objects_is_refused(tmp_path):
    import torch

    torch.save({"weight": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ModelError, match="could not be read as plain tensors"):
        preprocessors.convert_annotator(tmp_path / "evil.pth", tmp_path)


# --------------------------------------------------------------------------- runs


def test_a_fresh_controlnet_changes_nothing(manager, tiny_sd, fresh_controlnet, scene_picture):
    """Zero convolutions at zero: the controlled run is bit-identical to plain txt2img."""
    plain = txt2img(
        Txt2ImgSettings(prompt="a red circle on the left", model=str(tiny_sd), seed=3, steps=3), manager
    )
    controlled = run(settings(tiny_sd, [unit(fresh_controlnet)]), [scene_picture], manager)
    assert np.array_equal(pixels(controlled.images[0]), pixels(plain.images[0]))


def test_scale_and_the_map_steer_a_trained_controlnet(manager, tiny_sd, tiny_controlnet, scene_picture):
    plain = pixels(
        txt2img(
            Txt2ImgSettings(prompt="a red circle on the left", model=str(tiny_sd), seed=3, steps=3), manager
        ).images[0]
    )
    off = run(settings(tiny_sd, [unit(tiny_controlnet, scale=0.0)]), [scene_picture], manager)
    on = run(settings(tiny_sd, [unit(tiny_controlnet)]), [scene_picture], manager)
    other_map = run(settings(tiny_sd, [unit(tiny_controlnet)]), [scene_picture.rotate(90)], manager)
    assert np.array_equal(pixels(off.images[0]), plain)  # scale 0: the base model
    assert not np.array_equal(pixels(on.images[0]), plain)
    assert not np.array_equal(pixels(on.images[0]), pixels(other_map.images[0]))
    assert np.array_equal(pixels(on.figures["control map 1"]), pixels(canny_map(scene_picture, 100, 200)))


def test_several_units_and_their_step_windows(
    manager, tiny_sd, tiny_controlnet, fresh_controlnet, scene_picture
):
    units = [
        unit(tiny_controlnet, scale=0.7),
        unit(fresh_controlnet, preprocessor="segmentation_palette", start=0.3, end=0.9),
    ]
    result = run(settings(tiny_sd, units), [scene_picture, scene_picture], manager)
    assert list(result.figures) == ["control map 1", "control map 2"]
    late = run(settings(tiny_sd, [unit(tiny_controlnet, start=0.5)]), [scene_picture], manager)
    full = run(settings(tiny_sd, [unit(tiny_controlnet)]), [scene_picture], manager)
    assert not np.array_equal(pixels(late.images[0]), pixels(full.images[0]))


def test_a_t2i_adapter_runs_and_refuses_controlnet_only_options(
    manager, tiny_sd, tiny_adapter, scene_picture
):
    result = run(settings(tiny_sd, [unit(tiny_adapter)]), [scene_picture], manager)
    assert result.images[0].size == (64, 64)
    with pytest.raises(SettingsError, match="T2I-Adapters act at every step"):
        run(settings(tiny_sd, [unit(tiny_adapter)], guess_mode=True), [scene_picture], manager)


@pytest.mark.parametrize(
    "case, message",
    [
        ("wrong size map", "control map 1 is 70×60, but the picture is 64×64"),
        ("SDXL ControlNet on SD", "is for SDXL models, but"),
        ("mixed kinds", "don't mix"),
        ("unknown ControlNet", "unknown ControlNet"),
        ("ControlNet of another base model", "was made for another base model"),
    ],
)
def test_bad_runs_are_refused(
    manager, tiny_sd, tiny_controlnet, tiny_adapter, sdxl_controlnet, scene_picture, case, message
):
    inputs = [scene_picture]
    if case == "wrong size map":
        units, inputs = [unit(tiny_controlnet, preprocessor="none")], [Image.new("RGB", (70, 60))]
    elif case == "SDXL ControlNet on SD":
        units = [unit(sdxl_controlnet)]
    elif case == "mixed kinds":
        units, inputs = [unit(tiny_controlnet), unit(tiny_adapter)], [scene_picture] * 2
    elif case == "ControlNet of another base model":
        units = [unit(tiny_controlnet)]
        with pytest.raises(ModelError, match=message):  # the tiny ControlNet on toy-sd's UNet
            run(settings("toy-sd", units), inputs, manager)
        return
    else:
        units = [unit("not-a-controlnet")]
    with pytest.raises((SettingsError, ModelError), match=message):
        run(settings(tiny_sd, units), inputs, manager)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(scale=2.5), "conditioning scale must be between"),
        (dict(start=0.8, end=0.5), "start (0.8) must come before end (0.5)"),
        (dict(preprocessor="sobel"), "unknown preprocessor 'sobel'"),
        (dict(preprocessor="canny", threshold_a=300), "low threshold must be between"),
        (dict(preprocessor="none", threshold_a=3), "takes no such threshold"),
    ],
)
def test_bad_units_are_refused(changes, message):
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ControlNetSettings(prompt="x", units=(ControlUnit(**changes),))


def test_settings_round_trip_through_the_registry():
    s = ControlNetSettings(
        prompt="a red circle",
        seed=1,
        units=(ControlUnit("a", 0.5, 0.1, 0.9, "canny", 128, 50, 150, 7), ControlUnit("b")),
        guess_mode=True,
    )
    assert settings_from_dict(s.to_dict()) == s


def test_studio_stores_the_maps_and_remakes_from_them(
    studio, tiny_sd, tiny_controlnet, scene_picture, tmp_path
):
    path = tmp_path / "scene.png"
    scene_picture.save(path)
    result, items = studio.controlnet(settings(tiny_sd, [unit(tiny_controlnet)]), [path])
    (image,) = items
    stored_map = studio.gallery.get(image.parent_id)
    assert stored_map.technique == "control map"
    assert result.settings.units[0].map_id == stored_map.id
    # Restoring the stored settings (map id, no upload) remakes the image exactly, storing no new map.
    again, items2 = studio.controlnet(settings_from_dict(image.settings))
    assert np.array_equal(pixels(again.images[0]), pixels(result.images[0]))
    assert items2[0].parent_id == stored_map.id and studio.gallery.count() == 3


def test_pictures_go_to_the_units_without_a_stored_map(
    studio, tiny_sd, tiny_controlnet, fresh_controlnet, scene_picture
):
    _, (first,) = studio.controlnet(settings(tiny_sd, [unit(tiny_controlnet)]), [scene_picture])
    stored = studio.gallery.get(first.parent_id)
    two = settings(
        tiny_sd, [unit(tiny_controlnet, map_id=stored.id), unit(fresh_controlnet, preprocessor="canny")]
    )
    result, (image,) = studio.controlnet(two, [scene_picture.rotate(90)])  # one picture, for unit 2
    assert result.settings.units[0].map_id == stored.id and image.parent_id == stored.id
    assert result.settings.units[1].map_id not in (None, stored.id)
    with pytest.raises(SettingsError, match="2 control units, 1 without a stored map, but 3 pictures"):
        studio.controlnet(two, [scene_picture] * 3)


def test_cli_writes_the_image_and_its_maps(tmp_path, tiny_sd, tiny_controlnet, scene_picture):
    scene_picture.save(tmp_path / "in.png")
    cmd = [
        sys.executable,
        "-m",
        "studio",
        "controlnet",
        "--data-dir",
        str(tmp_path / "data"),
        "--model",
        str(tiny_sd),
    ]
    done = subprocess.run(
        cmd
        + [
            "--controlnet",
            f"{tiny_controlnet}:0.8",
            "--image",
            str(tmp_path / "in.png"),
            "--preprocessor",
            "canny",
            "--prompt",
            "a red circle",
            "--steps",
            "3",
            "--seed",
            "4",
            "--out",
            str(tmp_path / "out.png"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out.png").exists() and (tmp_path / "out.map1.png").exists()
    assert "(parent #1)" in done.stdout
    bad = subprocess.run(
        cmd
        + [
            "--controlnet",
            str(tiny_controlnet),
            "--image",
            str(tmp_path / "in.png"),
            "--preprocessor",
            "sobel",
            "--prompt",
            "x",
            "--out",
            str(tmp_path / "bad.png"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
        "error: unknown preprocessor 'sobel'"
    )
    assert "Traceback" not in bad.stderr
