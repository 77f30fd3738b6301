"""PickScore and HPSv2 on tiny randomly initialised models saved in the real on-disk formats (a
Hugging Face cache snapshot; HPS v2's pickled checkpoint, converted by the CLI), against the
reference formulas; and the messages naming what is missing."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

from studio.evaluate import EvaluationSettings, score_pictures
from studio.models import ModelError, ModelManager
from studio.preference import PICKSCORE, PICKSCORE_PROCESSOR, load, missing

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def pictures_and_prompts(n: int = 5):
    from studio.toyworld.captions import sample_pair
    from studio.toyworld.render import render

    rng = random.Random(7)
    pairs = [sample_pair(rng) for _ in range(n)]
    return [render(scene) for _, scene in pairs], [caption for caption, _ in pairs]


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache that huggingface_hub looks in."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def snapshot(cache: Path, repo: str) -> Path:
    """A repo's snapshot folder laid out as hf_hub_download leaves it (refs/main → the commit)."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    (folder / "snapshots" / COMMIT).mkdir(parents=True)
    return folder / "snapshots" / COMMIT


def save_tiny_pickscore(model_folder: Path, processor_folder: Path) -> None:
    """A tiny random CLIPModel saved as yuvalkirstain/PickScore_v1 is (config.json,
    model.safetensors), a CLIP processor as laion/CLIP-ViT-H-14-laion2B-s32B-b79K's."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from studio.toyworld.train.common import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    common = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **common,
        ),
        vision_config=dict(image_size=32, patch_size=8, **common),
        projection_dim=16,
        logit_scale_init_value=float(np.log(40.0)),
    )
    CLIPModel(config).save_pretrained(model_folder)
    # the laion repo's layout: its model's config.json, preprocessor_config.json, the tokenizer's files
    config.save_pretrained(processor_folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        processor_folder
    )
    tokenizer.save_pretrained(processor_folder)


def pickscore_reference(model_folder, processor_folder, images, prompts) -> np.ndarray:
    """The PickScore README's calc_probs, before its softmax: one prompt, its picture."""
    import torch
    from transformers import AutoModel, AutoProcessor

    processor = AutoProcessor.from_pretrained(processor_folder)
    model = AutoModel.from_pretrained(model_folder).eval()

    def embeds(output):
        return output if torch.is_tensor(output) else output.pooler_output

    scores = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts, strict=True):
            image_inputs = processor(images=[image], return_tensors="pt")
            text_inputs = processor(
                text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt"
            )
            image_embs = embeds(model.get_image_features(**image_inputs))
            image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
            text_embs = embeds(model.get_text_features(**text_inputs))
            text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
            scores.append(float((model.logit_scale.exp() * (text_embs @ image_embs.T))[0, 0]))
    return np.array(scores)


def test_pickscore_from_the_hub_cache_is_the_reference_formula(hub_cache, tmp_path):
    model_folder, processor_folder = snapshot(hub_cache, PICKSCORE), snapshot(hub_cache, PICKSCORE_PROCESSOR)
    save_tiny_pickscore(model_folder, processor_folder)
    images, prompts = pictures_and_prompts()
    expected = pickscore_reference(model_folder, processor_folder, images, prompts)
    scores = load("pickscore", None).scores(images, prompts)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)
    assert np.ptp(expected) > 1e-3  # the pictures and prompts tell apart
    s = EvaluationSettings(metrics=("pickscore",), images=str(tmp_path))
    report = score_pictures(s, images, prompts, ModelManager(device="cpu"))
    assert report.results()["pickscore"] == pytest.approx(expected.mean(), abs=1e-4)


def test_pickscore_names_what_is_missing(hub_cache, tmp_path):
    metrics = tmp_path / "library" / "metrics"
    assert missing("pickscore", None) == (
        f"pickscore needs {PICKSCORE} (model.safetensors) and the processor of {PICKSCORE_PROCESSOR} "
        "in the Hugging Face cache; none is on this machine"
    )
    with pytest.raises(ModelError, match="pickscore needs"):
        load("pickscore", metrics)
    save_tiny_pickscore(snapshot(hub_cache, PICKSCORE), tmp_path / "elsewhere")
    assert missing("pickscore", metrics) == (
        f"pickscore needs the processor of {PICKSCORE_PROCESSOR} in the Hugging Face cache or {metrics}/; "
        "none is on this machine"
    )
    (tmp_path / "elsewhere").rename(
        metrics.mkdir(parents=True) or metrics / "CLIP-ViT-H-14-laion2B-s32B-b79K"
    )
    assert missing("pickscore", metrics) == ""  # the library's metrics folder counts too


# --------------------------------------------------------------------------- HPSv2

TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def tiny_hps(tmp_path_factory) -> Path:
    """A tiny open_clip architecture ("tiny-hps", registered in this process), randomly
    initialised and saved as HPS v2's checkpoint is: a pickle of {"state_dict": ...}."""
    import open_clip
    import torch

    folder = tmp_path_factory.mktemp("hps")
    (folder / "tiny-hps.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(folder / "tiny-hps.json")
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-hps", pretrained=None)
    torch.save({"state_dict": model.state_dict(), "epoch": 1}, folder / "HPS_v2_compressed.pt")
    return folder / "HPS_v2_compressed.pt"


def hpsv2_reference(checkpoint: Path, images, prompts) -> np.ndarray:
    """hpsv2's img_score.score: the checkpoint's state_dict in the architecture, preprocess_val,
    the architecture's tokenizer, then diag(image_features @ text_features.T)."""
    import open_clip
    import torch

    model, _, preprocess_val = open_clip.create_model_and_transforms(
        "tiny-hps", pretrained=None, output_dict=True
    )
    model.load_state_dict(torch.load(checkpoint, map_location="cpu")["state_dict"])
    model.eval()
    tokenizer = open_clip.get_tokenizer("tiny-hps")
    scores = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts, strict=True):
            outputs = model(preprocess_val(image).unsqueeze(0), tokenizer([prompt]))
            logits_per_image = outputs["image_features"] @ outputs["text_features"].T
            scores.append(float(torch.diagonal(logits_per_image)[0]))
    return np.array(scores)


def test_hpsv2_converted_by_the_cli_is_the_reference_formula(tiny_hps, tmp_path, hub_cache):
    data = tmp_path / "data"
    models = ModelManager(device="cpu", user_dir=data / "library")
    assert "python -m studio convert-hpsv2 FILE" in missing("hpsv2", data / "library" / "metrics")
    done = subprocess.run(
        [sys.executable, "-m", "studio", "convert-hpsv2", str(tiny_hps), "--arch", "tiny-hps"]
        + ["--data-dir", str(data)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(data / "library" / "metrics" / "hpsv2.safetensors")
    images, prompts = pictures_and_prompts()
    expected = hpsv2_reference(tiny_hps, images, prompts)
    scores = load("hpsv2", data / "library" / "metrics").scores(images, prompts)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    assert np.ptp(expected) > 1e-4
    report = score_pictures(
        EvaluationSettings(metrics=("hpsv2",), images=str(tmp_path)), images, prompts, models
    )
    assert report.results()["hpsv2"] == pytest.approx(expected.mean(), abs=1e-4)


def test_hpsv2_names_a_cached_checkpoint_to_convert(hub_cache, tmp_path):
    folder = snapshot(hub_cache, "xswu/HPSv2")
    (folder / "HPS_v2_compressed.pt").write_bytes(b"not read")
    message = missing("hpsv2", tmp_path / "metrics")
    assert message.startswith("hpsv2 needs the HPS v2 checkpoint (xswu/HPSv2's HPS_v2_compressed.pt)")
    assert message.endswith(
        f"python -m studio convert-hpsv2 FILE; HPS_v2_compressed.pt is at {folder}/HPS_v2_compressed.pt"
    )


def test_imagereward_says_why_it_cant_run(tmp_path):
    from studio.evaluate import check_metrics_available

    with pytest.raises(
        ModelError, match="imagereward needs the ImageReward model, which this studio can't run"
    ):
        check_metrics_available(
            EvaluationSettings(metrics=("imagereward",), images=str(tmp_path)),
            ModelManager(device="cpu", user_dir=tmp_path),
        )
