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
