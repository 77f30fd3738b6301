"""Evaluation: generate over a grid, score, store; the CLI's results.json; refusals and cancel."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

from studio.evaluate import EvaluationSettings
from studio.models import ModelError
from studio.progress import Cancelled
from studio.registry import settings_from_dict
from studio.settings import SettingsError

PROMPTS = ("a red circle on the left", "a blue square")


def tiny_settings(tiny_sd, **changes) -> EvaluationSettings:
    base = dict(
        metrics=("clip-score", "fid"),
        models=(str(tiny_sd),),
        prompt_set="custom",
        prompts=PROMPTS,
        values=("1", "5"),
        samples=2,
        steps=2,
    )
    base.update(changes)
    return EvaluationSettings(**base)


def test_a_grid_is_generated_scored_and_stored(studio, tiny_sd):
    seen = []
    report, record = studio.evaluate(
        tiny_settings(tiny_sd), on_progress=lambda done, total: seen.append((done, total))
    )
    assert seen[-1] == (8, 8)  # 2 prompts × 2 seeds × 2 guidance values
    assert [(c.model, c.value, len(c.images)) for c in report.cells] == [
        (str(tiny_sd), "1", 4),
        (str(tiny_sd), "5", 4),
    ]
    results = report.results()
    assert set(results["fid"][str(tiny_sd)]) == {"1", "5"}
    assert all(0 <= v <= 100 for v in results["clip-score"][str(tiny_sd)].values())
    assert any("not Inception-V3's FID" in n for n in report.notes)
    assert any("biased upward at small N" in n for n in report.notes)
    stored = studio.gallery.evaluations()
    assert stored == [record] and record.results == {**results, "notes": report.notes}
    assert studio.gallery.evaluation(record.id) == record
    assert settings_from_dict(record.settings) == report.settings
    figures = [studio.gallery.get(i) for i in record.figure_ids]
    assert {f.prompt for f in figures} == {"grid", "clip-score against guidance", "fid against guidance"}


def test_the_same_seeds_give_the_same_numbers(manager, tiny_sd):
    from studio.evaluate import run

    a = run(tiny_settings(tiny_sd, values=("3",)), manager).results()
    b = run(tiny_settings(tiny_sd, values=("3",)), manager).results()
    assert a == b


def test_cancel_stores_nothing(studio, tiny_sd):
    def stop(done, total):
        raise Cancelled("stop")

    with pytest.raises(Cancelled):
        studio.evaluate(tiny_settings(tiny_sd), on_progress=stop)
    assert studio.gallery.evaluations() == [] and studio.gallery.count() == 0


@pytest.mark.parametrize(
    "changes, error, message",
    [
        (dict(metrics=("pickscore",)), ModelError, "PickScore_v1"),
        (dict(metrics=("toy-geneval",)), SettingsError, "toy-geneval scores its own prompt set"),
        (dict(values=("hot",)), SettingsError, "guidance value 'hot' is not a number"),
        (dict(metrics=("lpips",)), SettingsError, "unknown metric 'lpips'"),
        (  # 6 colours × 3 shapes: a 19th single-object prompt doesn't exist (it used to hang)
            dict(prompt_set="toy-geneval", per_category=19),
            SettingsError,
            "prompts per category must be between 1 and 18",
        ),
        (dict(axis="colour"), SettingsError, "grid axis must be one of"),
        (dict(axis="lora", values=("0", "1")), SettingsError, "the lora axis needs a LoRA"),
        (
            dict(axis="lora", lora="x.safetensors", values=("heavy",)),
            SettingsError,
            "LoRA weight 'heavy' is not",
        ),
        (
            dict(axis="lora", lora="x.safetensors", values=("5",)),
            SettingsError,
            "between -4.0 and 4.0, not 5.0",
        ),
        (dict(lora="x.safetensors"), SettingsError, "a LoRA is evaluated over the lora axis"),
        (
            dict(axis="lora", lora="no-such.safetensors", values=("1",)),
            ModelError,
            "LoRA 'no-such.safetensors' not found",
        ),
    ],
)
def test_refusals_say_why(studio, tiny_sd, changes, error, message):
    with pytest.raises(error, match=message):
        studio.evaluate(tiny_settings(tiny_sd, **changes))
    assert studio.gallery.count() == 0


def test_cli_writes_results_json_and_plots(tmp_path, tiny_sd):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "studio",
            "evaluate",
            "--data-dir",
            str(tmp_path / "data"),
            "--metric",
            "clip-score",
            "--model",
            str(tiny_sd),
            "--prompts",
            str(prompts),
            "--grid",
            "steps=1,2",
            "--out-dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads((out / "results.json").read_text())
    assert set(results["clip-score"][str(tiny_sd)]) == {"1", "2"}
    assert (out / "grid.png").exists() and (out / "clip-score_against_steps.png").exists()
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "studio",
            "evaluate",
            "--metric",
            "hpsv2",
            "--model",
            "toy-sd",
            "--out-dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: hpsv2 needs")


def test_an_evaluation_job_stores_its_numbers_and_figures(studio, tiny_sd):
    job = studio.start_evaluation(tiny_settings(tiny_sd, metrics=("clip-score",), values=("1", "5")))
    state = studio.jobs.wait(job, timeout=300)
    assert (state.status, state.kind, state.step, state.total) == ("done", "evaluation", 8, 8)
    record = studio.gallery.evaluations()[0]
    assert state.result["evaluation_id"] == record.id
    assert state.result["clip-score"] == record.results["clip-score"]
    assert json.loads((Path(state.out_dir) / "results.json").read_text()) == {
        k: v for k, v in record.results.items() if k != "notes"
    }
    assert state.result["notes"] == record.results["notes"]
    assert set(state.result["figures"]) == {"grid", "clip-score against guidance"}
    assert all(
        Path(p).parent == Path(state.out_dir) and Path(p).is_file() for p in state.result["figures"].values()
    )
    assert state.settings == tiny_settings(tiny_sd, metrics=("clip-score",), values=("1", "5")).to_dict()


def test_an_evaluation_job_is_refused_before_it_is_queued_or_cancelled_midway(studio, tiny_sd):
    with pytest.raises(ModelError, match="imagereward needs"):
        studio.start_evaluation(tiny_settings(tiny_sd, metrics=("imagereward",)))
    with pytest.raises(SettingsError, match="Flow Euler does not work with sd"):
        studio.start_evaluation(tiny_settings(tiny_sd, axis="scheduler", values=("DDIM", "Flow Euler")))
    assert studio.jobs.list() == []
    job = studio.start_evaluation(tiny_settings(tiny_sd, steps=150, samples=8))
    deadline = time.monotonic() + 300
    while "images generated" not in studio.jobs.get(job).message:  # denoising the first batch
        assert time.monotonic() < deadline
        time.sleep(0.05)
    studio.jobs.cancel(job)
    state = studio.jobs.wait(job, timeout=300)
    assert state.status == "cancelled" and state.step < state.total == 32
    assert studio.gallery.evaluations() == [] and studio.gallery.count() == 0


# --------------------------------------------------------------------------- the LoRA weight axis


@pytest.fixture(scope="module")
def tiny_lora(tiny_sd, tmp_path_factory) -> Path:
    """A diffusers LoRA file for tiny-sd whose up-projections are large enough to show."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, dtype=torch.float32)
    pipe.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v"])
    )
    torch.manual_seed(0)
    for name, p in pipe.unet.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 1.0)
    folder = tmp_path_factory.mktemp("eval-lora")
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


def test_the_lora_axis_generates_each_cell_at_its_weight(manager, tiny_sd, tiny_lora):
    import numpy as np

    from studio.evaluate import run

    s = tiny_settings(tiny_sd, metrics=("clip-score",), axis="lora", lora=str(tiny_lora), values=("0", "1"))
    report = run(s, manager)
    without, full = (np.stack([np.asarray(im) for im in c.images]) for c in report.cells)
    plain = run(tiny_settings(tiny_sd, metrics=("clip-score",), axis="steps", values=("2",)), manager)
    assert np.array_equal(without, np.stack([np.asarray(im) for im in plain.cells[0].images]))  # 0: no LoRA
    assert not np.array_equal(without, full)
    assert not any("lora" in n for n, _ in manager.base(str(tiny_sd)).unet.named_parameters())  # removed
    assert set(report.results()["clip-score"][str(tiny_sd)]) == {"0", "1"}
    assert set(report.figures) == {"grid", "clip-score against lora"}


def test_the_lora_axis_takes_a_library_lora_by_name_and_refuses_another_family(tiny_sd, tiny_lora, tmp_path):
    import shutil

    from studio.evaluate import check, run
    from studio.models import ModelManager

    library = tmp_path / "library"
    (library / "loras").mkdir(parents=True)
    for name, family in (("mine", "sd"), ("for-sd3", "sd3")):
        shutil.copy(tiny_lora, library / "loras" / f"{name}.safetensors")
        (library / "loras" / f"{name}.json").write_text(json.dumps({"family": family, "base": "x"}))
    models = ModelManager(device="cpu", user_dir=library)
    assert {"mine", "for-sd3"} <= {spec.name for spec in models.loras()}  # what the tab's dropdown offers
    by_name = tiny_settings(
        tiny_sd, metrics=("clip-score",), axis="lora", lora="mine", values=("1",), samples=1
    )
    by_path = by_name.replace(lora=str(tiny_lora))
    assert [c.images for c in run(by_name, models).cells] == [c.images for c in run(by_path, models).cells]
    with pytest.raises(ModelError, match="LoRA for-sd3 is for sd3 models, not sd"):
        check(by_name.replace(lora="for-sd3"), models)


def test_settings_without_the_lora_field_still_read():
    old = EvaluationSettings().to_dict()
    del old["lora"]
    assert EvaluationSettings.from_dict(old) == EvaluationSettings()
    s = EvaluationSettings(axis="lora", lora="mine", values=("0", "0.5", "1"))
    assert EvaluationSettings.from_dict(s.to_dict()) == s


def test_cli_grids_a_lora_weight(tmp_path, tiny_sd, tiny_lora):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out"
    args = [sys.executable, "-m", "studio", "evaluate", "--data-dir", str(tmp_path / "data"), "--metric"]
    args += ["clip-score", "--model", str(tiny_sd), "--prompts", str(prompts), "--steps", "2", "--no-gallery"]
    done = subprocess.run(
        [*args, "--grid", "lora=0,1", "--lora", str(tiny_lora), "--out-dir", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads((out / "results.json").read_text())
    assert set(results["clip-score"][str(tiny_sd)]) == {"0", "1"}
    assert (out / "clip-score_against_lora.png").exists()
    bad = subprocess.run(
        [*args, "--grid", "lora=0,1", "--out-dir", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: the lora axis needs a LoRA")


# --------------------------------------------------------------------------- scoring a folder of pictures


@pytest.fixture
def renders(tmp_path) -> Path:
    """Toy-world renders as PNGs whose metadata records their own captions as prompts."""
    import random

    from studio.pngmeta import write_png
    from studio.toyworld.captions import sample_pair
    from studio.toyworld.render import render

    folder = tmp_path / "renders"
    folder.mkdir()
    rng = random.Random(5)
    for i in range(4):
        caption, scene = sample_pair(rng)
        write_png(folder / f"{i:04d}.png", render(scene), caption, {"prompt": caption})
    return folder


def test_a_job_scores_a_folder_of_pictures(studio, renders):
    from studio.evaluate import results_table

    s = EvaluationSettings(metrics=("toy-geneval", "clip-score"), prompt_set="general", images=str(renders))
    job = studio.start_evaluation(s)
    state = studio.jobs.wait(job, timeout=300)
    assert (state.status, state.step, state.total, state.message) == ("done", 4, 4, "scored")
    record = studio.gallery.evaluations()[0]
    assert record.results["toy-geneval"] == 1.0  # renders satisfy their own captions
    assert 0 < record.results["clip-score"] <= 100 and record.results["samples per cell"] == 4
    assert record.settings["models"] == ["pictures"] and record.settings["images"] == str(renders)
    headers, rows = results_table(record.settings, record.results)
    assert headers[:4] == ["model", "guidance", "toy-geneval", "clip-score"] and len(rows) == 1
    assert set(state.result["figures"]) == {"grid"}
    assert state.settings == s.to_dict()


def test_scoring_pictures_is_refused_with_a_reason(studio, renders, tmp_path):
    (tmp_path / "empty").mkdir()
    for folder, message in (("", "give the folder of pictures"), (str(tmp_path / "gone"), "does not exist")):
        with pytest.raises(SettingsError, match=message):
            studio.start_evaluation(EvaluationSettings(images=folder))
    with pytest.raises(SettingsError, match="has no PNG pictures"):
        studio.start_evaluation(EvaluationSettings(images=str(tmp_path / "empty")))
    from PIL import Image

    Image.new("RGB", (64, 64), "white").save(renders / "bare.png")
    with pytest.raises(SettingsError, match="1 pictures carry no prompt"):
        studio.evaluate(EvaluationSettings(metrics=("clip-score",), images=str(renders)))
    assert studio.jobs.list() == [] and studio.gallery.evaluations() == []


def test_cli_scores_a_folder_of_pictures(tmp_path, renders):
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "studio", "evaluate", "--data-dir", str(tmp_path / "data"), "--metric"]
        + ["toy-geneval", "--images", str(renders), "--out-dir", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "results.json").read_text())["toy-geneval"] == 1.0
    assert (out / "grid.png").exists() and "stored as evaluation #1" in done.stdout


# --------------------------------------------------------------------------- scoring gallery pictures


@pytest.fixture
def gallery_renders(studio) -> list[int]:
    """Toy-world renders stored in the gallery with their captions as prompts; their ids."""
    import random

    from studio.toyworld.captions import sample_pair
    from studio.toyworld.render import render

    rng = random.Random(9)
    ids = []
    for _ in range(3):
        caption, scene = sample_pair(rng)
        ids.append(studio.gallery.add(render(scene), technique="txt2img", model="toy", prompt=caption).id)
    return ids


def test_gallery_pictures_are_scored_against_their_own_prompts(studio, gallery_renders):
    s = EvaluationSettings(metrics=("toy-geneval", "clip-score"), gallery_ids=tuple(gallery_renders))
    job = studio.start_evaluation(s)
    state = studio.jobs.wait(job, timeout=300)
    assert (state.status, state.step, state.total) == ("done", 3, 3)
    assert state.message == "scored"
    record = studio.gallery.evaluations()[0]
    assert record.results["toy-geneval"] == 1.0  # renders satisfy their own captions
    assert 0 < record.results["clip-score"] <= 100 and record.results["samples per cell"] == 3
    assert record.settings["gallery_ids"] == gallery_renders and record.settings["models"] == ["pictures"]
    with pytest.raises(SettingsError, match="the gallery has no picture with id 999, 998"):
        studio.start_evaluation(s.replace(gallery_ids=(gallery_renders[0], 999, 998)))
    with pytest.raises(SettingsError, match="a folder of pictures or gallery pictures, not both"):
        s.replace(images="x")


def test_gallery_ids_round_trip_through_settings_and_share_links():
    from studio.presets import decode_link, encode_link

    s = EvaluationSettings(metrics=("fid",), gallery_ids=(3, 4, 5), fid_features="clip")
    assert EvaluationSettings.from_dict(s.to_dict()) == s == decode_link(encode_link(s))
    old = EvaluationSettings().to_dict()
    del old["gallery_ids"], old["fid_features"]
    assert EvaluationSettings.from_dict(old) == EvaluationSettings()
    with pytest.raises(SettingsError, match="a gallery id must be between 1"):
        EvaluationSettings(gallery_ids=(0,))
    with pytest.raises(SettingsError, match="FID features must be one of auto, inception, clip"):
        EvaluationSettings(fid_features="vgg")


def test_cli_scores_gallery_pictures(tmp_path):
    import random

    from studio.models import ModelManager
    from studio.service import Paths, Studio
    from studio.toyworld.captions import sample_pair
    from studio.toyworld.render import render

    data = tmp_path / "data"
    studio = Studio(Paths.from_env(data), ModelManager(device="cpu"))
    rng = random.Random(11)
    ids = [
        studio.gallery.add(render(scene), technique="txt2img", model="toy", prompt=caption).id
        for caption, scene in (sample_pair(rng) for _ in range(3))
    ]
    studio.close()
    out = tmp_path / "out"
    args = [sys.executable, "-m", "studio", "evaluate", "--data-dir", str(data), "--metric", "toy-geneval"]
    done = subprocess.run(
        [*args, "--gallery-ids", ",".join(map(str, ids)), "--out-dir", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["toy-geneval"] == 1.0 and results["samples per cell"] == 3
    assert "stored as evaluation #1" in done.stdout
    for ids_text, message in (
        ("1,77", "error: the gallery has no picture with id 77"),
        ("1,x", "--gallery-ids"),
    ):
        bad = subprocess.run(
            [*args, "--gallery-ids", ids_text, "--out-dir", str(out)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=300,
        )
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr
