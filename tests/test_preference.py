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
from safetensors.torch import load_file, save_file

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
    reference = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    save_file(reference, folder / "reference.safetensors")  # the reference reads no pickle
    return folder / "HPS_v2_compressed.pt"


def hpsv2_reference(checkpoint: Path, images, prompts) -> np.ndarray:
    """hpsv2's img_score.score: the checkpoint's state_dict in the architecture, preprocess_val,
    the architecture's tokenizer, then diag(image_features @ text_features.T)."""
    import open_clip
    import torch

    model, _, preprocess_val = open_clip.create_model_and_transforms(
        "tiny-hps", pretrained=None, output_dict=True
    )
    model.load_state_dict(load_file(checkpoint.with_name("reference.safetensors")))
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


# --------------------------------------------------------------------------- ImageReward

IMAGE_REWARD_WHEEL = (
    "image-reward==1.5 --hash=sha256:b4917a680c3caa68a1ce3847cebab3ae6d5b4c409d7f8804f537b9d42662cf12"
)


@pytest.fixture(scope="module")
def image_reward_source(tmp_path_factory) -> Path:
    """image-reward 1.5's own source: its wheel from PyPI (hash-pinned, no dependencies),
    unpacked in a temporary folder and never installed."""
    import zipfile

    folder = tmp_path_factory.mktemp("image-reward-wheel")
    (folder / "requirements.txt").write_text(IMAGE_REWARD_WHEEL + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
        + ["-r", str(folder / "requirements.txt"), "-d", str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode:
        pytest.skip(f"image-reward 1.5's wheel could not be fetched: {done.stderr.strip().splitlines()[-1:]}")
    zipfile.ZipFile(next(folder.glob("image_reward-1.5-*.whl"))).extractall(folder / "src")
    return folder / "src" / "ImageReward"


def image_reward_stubs(source: Path, patch: pytest.MonkeyPatch, tokenizer: Path):
    """What image-reward 1.5's BLIP code needs beyond this stack, stood in so that its own
    modules run: fairscale (imported, used only for gradient checkpointing); transformers 4's
    chunking / pruning helpers and PreTrainedModel.get_head_mask / invert_attention_mask (as
    transformers 4.x defined them); init_weights (transformers 5 ties weights there; the weights
    are drawn afterwards); the tokenizer's additional_special_tokens_ids (transformers 5 calls
    them extra special tokens) and bert-base-uncased read from `tokenizer`. The package's
    __init__ files (which import OpenAI's clip) are skipped. Returns its ImageReward module."""
    import importlib
    import types

    import torch
    import transformers.modeling_utils
    import transformers.pytorch_utils
    from transformers import BertTokenizer

    for name in ("fairscale", "fairscale.nn", "fairscale.nn.checkpoint"):
        patch.setitem(sys.modules, name, types.ModuleType(name))
    wrapper = types.ModuleType("fairscale.nn.checkpoint.checkpoint_activations")
    wrapper.checkpoint_wrapper = lambda module: module
    patch.setitem(sys.modules, wrapper.__name__, wrapper)
    for name in ("apply_chunking_to_forward", "prune_linear_layer"):
        patch.setattr(
            transformers.modeling_utils, name, getattr(transformers.pytorch_utils, name), raising=False
        )
    patch.setattr(transformers.modeling_utils, "find_pruneable_heads_and_indices", None, raising=False)
    for name, folder in (("ImageReward", source), ("ImageReward.models", source / "models")):
        package = types.ModuleType(name)
        package.__path__ = [str(folder)]
        patch.setitem(sys.modules, name, package)
    med = importlib.import_module("ImageReward.models.BLIP.med")

    def invert_attention_mask(self, mask):
        return (1.0 - mask[:, None, None, :].to(self.dtype)) * torch.finfo(self.dtype).min

    patch.setattr(med.BertModel, "get_head_mask", lambda self, mask, n: [None] * n, raising=False)
    patch.setattr(med.BertModel, "invert_attention_mask", invert_attention_mask, raising=False)
    patch.setattr(med.BertModel, "init_weights", lambda self: setattr(self, "all_tied_weights_keys", {}))

    class Tokenizer(BertTokenizer):
        @property
        def additional_special_tokens_ids(self):
            return self.convert_tokens_to_ids(self.extra_special_tokens)

    blip = importlib.import_module("ImageReward.models.BLIP.blip")
    patch.setattr(
        blip,
        "BertTokenizer",
        types.SimpleNamespace(from_pretrained=lambda _: Tokenizer.from_pretrained(tokenizer)),
    )
    return importlib.import_module("ImageReward.ImageReward")


def image_reward_pairs():
    """Toy pictures and captions, and one more: a wide RGBA picture (centre crop, alpha dropped)
    under a prompt longer than ImageReward's 35 tokens (truncated)."""
    images, prompts = pictures_and_prompts()
    wide = images[0].resize((96, 64)).convert("RGBA")
    return images + [wide], prompts + [" and ".join(prompts)]


def save_bert_tokenizer(folder: Path, prompts) -> None:
    """A tiny uncased BERT vocabulary (bert-base-uncased's layout) covering the prompts' words."""
    words = sorted({w for p in prompts for w in p.lower().replace(",", " ").split()})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ","] + words) + "\n"
    )
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))


@pytest.fixture(scope="module")
def image_reward(image_reward_source, tmp_path_factory):
    """The package's own ImageReward, BLIP's ViT cut to 2 blocks of width 128 (heads of 64, 224 px,
    patch 16) and BERT to 2 layers (hidden 768, which its MLP(768) fixes; 12 heads), seeded random
    weights saved as ImageReward.pt is (the state dict) beside its med_config.json; and the
    package's score() of every pair."""
    import importlib

    import torch

    folder = tmp_path_factory.mktemp("image-reward")
    images, prompts = image_reward_pairs()
    save_bert_tokenizer(folder / "bert-base-uncased", prompts)
    vocab = len((folder / "bert-base-uncased" / "vocab.txt").read_text().split()) + 2  # [DEC], [ENC]
    med_config = dict(
        architectures=["BertModel"], attention_probs_dropout_prob=0.1, hidden_act="gelu",
        hidden_dropout_prob=0.1, hidden_size=768, initializer_range=0.02, intermediate_size=96,
        layer_norm_eps=1e-12, max_position_embeddings=64, model_type="bert", num_attention_heads=12,
        num_hidden_layers=2, pad_token_id=0, type_vocab_size=2, vocab_size=vocab, encoder_width=768,
        add_cross_attention=True,
    )  # fmt: skip
    (folder / "med_config.json").write_text(json.dumps(med_config))
    before = set(sys.modules)
    with pytest.MonkeyPatch.context() as patch:
        package = image_reward_stubs(image_reward_source, patch, folder / "bert-base-uncased")
        vit = importlib.import_module("ImageReward.models.BLIP.vit")

        def small(_vit, size, *_):  # create_vit's ViT, 2 blocks of width 128
            return vit.VisionTransformer(size, 16, embed_dim=128, depth=2, num_heads=2), 128

        patch.setattr(importlib.import_module("ImageReward.models.BLIP.blip_pretrain"), "create_vit", small)
        model = package.ImageReward(med_config=str(folder / "med_config.json")).eval()
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():  # weights that spread the scores (its own init leaves them near 0)
            for name, p in model.named_parameters():
                draw = torch.randn(p.shape, generator=generator)
                if name.endswith("bias"):
                    p.copy_(0.1 * draw)
                elif p.ndim == 1:  # LayerNorm scales
                    p.copy_(1 + 0.1 * draw)
                elif p.ndim >= 2 and "embed" not in name and "token" not in name:
                    p.copy_(draw / p[0].numel() ** 0.5)
                else:
                    p.copy_(0.5 * draw)
        expected = np.array(
            [model.score(prompt, image) for prompt, image in zip(prompts, images, strict=True)]
        )
        torch.save(model.state_dict(), folder / "ImageReward.pt")
    for name in set(sys.modules) - before:
        if name.startswith("ImageReward"):
            del sys.modules[name]
    return folder / "ImageReward.pt", images, prompts, expected


def test_imagereward_converted_by_the_cli_is_the_package_s_score(image_reward, tmp_path, hub_cache):
    from studio.pngmeta import write_png

    checkpoint, images, prompts, expected = image_reward
    data = tmp_path / "data"
    metrics = data / "library" / "metrics"
    assert missing("imagereward", metrics) == (
        f"imagereward needs THUDM/ImageReward's ImageReward.pt converted once into {metrics}/image-reward.safetensors "
        "with python -m studio convert-image-reward ImageReward.pt (its med_config.json beside it) and the "
        f"tokenizer of google-bert/bert-base-uncased (vocab.txt) in the Hugging Face cache or {metrics}/"
    )
    cli = [sys.executable, "-m", "studio"]
    done = subprocess.run(
        [*cli, "convert-image-reward", str(checkpoint), "--data-dir", str(data)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(metrics / "image-reward.safetensors")
    assert missing("imagereward", metrics).startswith(
        "imagereward needs the tokenizer of google-bert/bert-base-uncased"
    )
    save_bert_tokenizer(snapshot(hub_cache, "google-bert/bert-base-uncased"), prompts)
    assert missing("imagereward", metrics) == ""
    scores = load("imagereward", metrics).scores(images, prompts, batch=4)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)
    assert np.ptp(expected) > 0.5  # the pictures and prompts tell apart
    report = score_pictures(
        EvaluationSettings(metrics=("imagereward",), images=str(tmp_path)),
        images,
        prompts,
        ModelManager(device="cpu", user_dir=data / "library"),
    )
    assert report.results()["imagereward"] == pytest.approx(expected.mean(), abs=1e-4)
    # the command line, the tokenizer in the library's folder this time
    save_bert_tokenizer(metrics / "bert-base-uncased", prompts)
    (tmp_path / "pictures").mkdir()
    for i, (image, prompt) in enumerate(zip(images[:5], prompts, strict=False)):
        write_png(tmp_path / "pictures" / f"{i:04d}.png", image, prompt, {"prompt": prompt})
    done = subprocess.run(
        [*cli, "evaluate", "--data-dir", str(data), "--metric", "imagereward"]
        + ["--images", str(tmp_path / "pictures"), "--out-dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["imagereward"] == pytest.approx(expected[:5].mean(), abs=1e-4)


def test_imagereward_names_what_is_missing_and_refuses_other_checkpoints(hub_cache, tmp_path):
    import torch

    from studio.evaluate import check_metrics_available
    from studio.image_reward import convert_image_reward

    cached = snapshot(hub_cache, "THUDM/ImageReward")
    (cached / "ImageReward.pt").write_bytes(b"not read")
    with pytest.raises(ModelError) as refused:
        check_metrics_available(
            EvaluationSettings(metrics=("imagereward",), images=str(tmp_path)),
            ModelManager(device="cpu", user_dir=tmp_path / "library"),
        )
    assert f"python -m studio convert-image-reward {cached}/ImageReward.pt (its med_config.json" in str(
        refused.value
    )
    target = tmp_path / "image-reward.safetensors"
    with pytest.raises(ModelError, match="med_config.json does not exist: give THUDM/ImageReward's"):
        convert_image_reward(cached / "ImageReward.pt", target)
    (tmp_path / "med_config.json").write_text("{}")
    torch.save({"visual.proj": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(ModelError, match="other.pt is not an ImageReward checkpoint"):
        convert_image_reward(tmp_path / "other.pt", target)
    with pytest.raises(ModelError, match="gone.pt does not exist"):
        convert_image_reward(tmp_path / "gone.pt", target)
    assert not target.exists()
