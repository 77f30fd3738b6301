"""FID and CLIP-Score: the formula against scipy, the edge cases, and the toy CLIP's sense."""

from __future__ import annotations

import random

import numpy as np
import pytest
from conftest import ROOT
from PIL import ImageOps

from studio.metrics import MIN_SAMPLES, ClipEmbedder, clip_score, fid, frechet_distance, gaussian


def test_identical_sets_are_zero_apart():
    features = np.random.default_rng(0).normal(size=(300, 16))
    assert fid(features, features, "test").value == pytest.approx(0.0, abs=1e-6)


def test_matches_scipy_sqrtm_on_fixed_features():
    from scipy import linalg

    rng = np.random.default_rng(1)
    a = rng.normal(size=(400, 12))
    b = rng.normal(size=(500, 12)) @ rng.normal(size=(12, 12)) * 0.5 + 0.3
    (mu1, s1), (mu2, s2) = gaussian(a), gaussian(b)
    root = linalg.sqrtm(s1 @ s2).real
    direct = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, abs=1e-3)


def test_small_sets_carry_a_warning():
    rng = np.random.default_rng(2)
    result = fid(rng.normal(size=(100, 8)), rng.normal(size=(120, 8)), "test")
    assert result.n_a == 100 and f"fewer than {MIN_SAMPLES}" in result.warning
    with pytest.raises(ValueError, match="at least two"):
        fid(rng.normal(size=(1, 8)), rng.normal(size=(10, 8)), "test")


def test_clip_score_is_100_cos_clamped():
    assert clip_score([[1, 0]], [[1, 0]]) == pytest.approx(100)
    assert clip_score([[1, 0], [0, 1]], [[-1, 0], [1, 1]]) == pytest.approx(50 * np.cos(np.pi / 4))


def test_toy_clip_prefers_the_right_caption_and_tells_sets_apart():
    from studio.toyworld.captions import sample_pair
    from studio.toyworld.render import render

    clip = ClipEmbedder(ROOT / "assets" / "models" / "toy-clip")
    rng = random.Random(3)
    pairs = [sample_pair(rng) for _ in range(64)]
    images = [render(scene) for _, scene in pairs]
    image_features = clip.image_features(images)
    right = clip_score(image_features, clip.text_features([c for c, _ in pairs]))
    wrong = clip_score(image_features, clip.text_features([c for c, _ in pairs[1:] + pairs[:1]]))
    assert right > wrong
    more = [render(sample_pair(rng)[1]) for _ in range(64)]
    same_world = fid(image_features, clip.image_features(more), clip.space).value
    inverted = fid(
        image_features, clip.image_features([ImageOps.invert(im) for im in more]), clip.space
    ).value
    assert same_world < inverted / 2


# --------------------------------------------------------------------------- FID over Inception-V3


def _renders(folder, seed: int, n: int, size: int = 64):
    """Toy-world renders as PNGs (their captions as prompts), `n` of them, `size` px."""
    from studio.pngmeta import write_png
    from studio.toyworld.captions import sample_pair
    from studio.toyworld.render import render

    folder.mkdir(parents=True)
    rng = random.Random(seed)
    for i in range(n):
        caption, scene = sample_pair(rng)
        write_png(folder / f"{i:04d}.png", render(scene).resize((size, size)), caption, {"prompt": caption})
    return folder


@pytest.fixture(scope="module")
def inception_pth(tmp_path_factory):
    """A randomly initialised torch-fidelity FeatureExtractorInceptionV3 saved as the published
    .pth is (a plain state dict), its batch norms set from one batch of random pictures so that
    the pool3 features are of order one instead of vanishing."""
    from unittest import mock

    import torch
    from torch_fidelity import feature_extractor_inceptionv3 as port

    torch.manual_seed(0)
    with (
        mock.patch.object(port, "load_state_dict_from_url", return_value=None),
        mock.patch.object(port.FeatureExtractorInceptionV3, "load_state_dict"),
    ):
        net = port.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # the running statistics become the batch's
    net.train()
    with torch.no_grad():
        net((torch.rand(8, 3, 64, 64) * 255).to(torch.uint8))
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    return path


def test_inception_features_are_torch_fidelitys(inception_pth, tmp_path):
    """The studio's extractor, read from the converted safetensors, gives torch-fidelity's own
    features (its extractor built from the .pth) for pictures of several sizes, in order."""
    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from studio.images import open_image
    from studio.inception import InceptionEmbedder, convert_inception

    weights = convert_inception(inception_pth, tmp_path / "metrics" / "inception-v3-fid.safetensors")
    pictures = [open_image(p) for p in sorted(_renders(tmp_path / "a", 1, 3).glob("*.png"))]
    pictures.insert(1, pictures[0].resize((80, 48)))
    ours = InceptionEmbedder(weights).image_features(pictures)
    theirs_net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], str(inception_pth))
    with torch.no_grad():
        theirs = np.concatenate(
            [theirs_net(torch.from_numpy(np.array(p)).permute(2, 0, 1)[None])[0].numpy() for p in pictures]
        )
    assert ours.shape == (4, 2048) and np.abs(theirs).mean() > 1e-2
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())


def test_convert_inception_refuses_other_files(tmp_path):
    import torch

    from studio.inception import convert_inception
    from studio.models import ModelError

    torch.save({"conv.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(ModelError, match="is not the FID Inception-V3"):
        convert_inception(tmp_path / "other.pth", tmp_path / "out.safetensors")
    with pytest.raises(ModelError, match="does not exist"):
        convert_inception(tmp_path / "missing.pth", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_cli_converts_inception_and_fid_is_torch_fidelitys(inception_pth, tmp_path):
    """convert-inception puts the weights where the studio looks; the CLI's FID then equals
    torch-fidelity's calculate_metrics on the same weights and pictures, and names its space."""
    import json
    import subprocess
    import sys

    import torch_fidelity

    data = tmp_path / "data"
    a, b = _renders(tmp_path / "a", 2, 12), _renders(tmp_path / "b", 3, 14)
    cli = [sys.executable, "-m", "studio"]
    done = subprocess.run(
        [*cli, "convert-inception", str(inception_pth), "--data-dir", str(data)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(data / "library" / "metrics" / "inception-v3-fid.safetensors")
    done = subprocess.run(
        [*cli, "evaluate", "--data-dir", str(data), "--metric", "fid", "--images", str(a)]
        + ["--reference", str(b), "--no-gallery", "--out-dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    ours = json.loads((tmp_path / "out" / "results.json").read_text())["fid"]
    theirs = torch_fidelity.calculate_metrics(
        input1=str(a),
        input2=str(b),
        fid=True,
        cuda=False,
        verbose=False,
        save_cpu_ram=True,  # no loader worker processes
        feature_extractor_weights_path=str(inception_pth),
    )["frechet_inception_distance"]
    assert theirs > 1 and ours == pytest.approx(theirs, rel=1e-4)
    assert "FID over Inception-V3 pool3 (2048) features" in done.stderr
    assert "TensorFlow-1.x-compatible bilinear resize to 299×299" in done.stderr
    assert "not Inception-V3's FID" not in done.stderr


def test_without_inception_weights_fid_stays_over_clip_and_says_so(tmp_path):
    from studio.evaluate import EvaluationSettings, Scorers, check_metrics_available
    from studio.models import ModelError, ModelManager

    models = ModelManager(device="cpu", user_dir=tmp_path / "library")
    s = EvaluationSettings(metrics=("fid",), images=str(tmp_path))
    scorers = Scorers(s, models)
    assert scorers.fid is scorers.clip and scorers.fid.space.startswith("CLIP image embeddings of")
    assert scorers.fid_note("x").endswith("not Inception-V3's FID")
    with pytest.raises(ModelError, match="convert-inception"):
        check_metrics_available(s.replace(fid_features="inception"), models)
