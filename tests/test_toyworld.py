"""The toy world's contract in code: captions, renders, control maps, the judge, toy GenEval."""

from __future__ import annotations

import random

import numpy as np
import pytest

from studio.toyworld import captions, judge, render, world
from studio.toyworld.geneval import CATEGORIES, HELD_OUT, evaluate, prompt_set


def test_caption_grammar_round_trips():
    rng = random.Random(0)
    for _ in range(500):
        spec = captions.sample_spec(rng, allow_held_out=True)
        assert captions.parse_caption(captions.format_caption(spec)) == spec


@pytest.mark.parametrize(
    "text",
    [
        "a red circle",
        "a small blue square on the left on a black background",
        "a green triangle above a red circle",
        "three yellow triangles on a gray background",
        "a shape on the right",
        "two shapes",
        "a sks shape",
    ],
)
def test_parse_accepts_the_grammar(text):
    if "sks" in text:
        with pytest.raises(ValueError):
            captions.parse_caption(text)
    else:
        assert captions.format_caption(captions.parse_caption(text)) == text


def test_parse_refuses_other_text():
    for text in ["a pink circle", "a red circle to the right of a square", "four red circles", ""]:
        with pytest.raises(ValueError):
            captions.parse_caption(text)


def test_render_is_flat_palette_and_reproducible():
    rng = random.Random(1)
    caption, scene = captions.sample_pair(rng)
    img = render.render(scene)
    assert img.size == (64, 64) and img.mode == "RGB"
    assert np.array_equal(np.asarray(img), np.asarray(render.render(scene)))
    px = np.asarray(img).reshape(-1, 3)
    palette = {tuple(c) for c in world.COLORS.values()} | {tuple(c) for c in world.BACKGROUNDS.values()}
    exact = np.mean([tuple(p) in palette for p in px])
    assert exact > 0.85  # all but the anti-aliased edge pixels


def test_sampled_scenes_keep_the_rules():
    rng = random.Random(2)
    for _ in range(300):
        spec = captions.sample_spec(rng)
        scene = captions.sample_scene(spec, rng)
        assert len(scene.shapes) == len(spec.objects)
        for i, a in enumerate(scene.shapes):
            assert world.inside_canvas(a)
            assert 12 <= a.size <= 30
            for b in scene.shapes[i + 1 :]:
                assert world.apart(a, b)
        assert not captions.is_held_out(spec)
        assert all(s.kind != "star" for s in scene.shapes)


def test_judge_reads_ground_truth_renders_right_99_percent():
    rng = random.Random(3)
    n, ok = 1000, 0
    for _ in range(n):
        spec = captions.sample_spec(rng, allow_held_out=True)
        ok += judge.satisfies(render.render(captions.sample_scene(spec, rng)), spec)
    assert ok / n >= 0.99


def test_judge_reads_stars_and_rejects_wrong_pictures():
    rng = random.Random(4)
    star = captions.CaptionSpec((captions.ObjectSpec(shape="star"),))
    assert (
        sum(judge.satisfies(render.render(captions.sample_scene(star, rng)), star) for _ in range(100)) >= 99
    )
    _, scene = captions.sample_pair(rng)
    red_left = captions.parse_caption("a red circle on the left")
    blue_right = captions.parse_caption("a blue square on the right")
    img = render.render(captions.sample_scene(red_left, rng))
    assert judge.satisfies(img, red_left) and not judge.satisfies(img, blue_right)
    assert not judge.satisfies(img, "two red circles")


def test_control_maps():
    rng = random.Random(5)
    _, scene = captions.sample_pair(rng)
    seg = np.asarray(render.segmentation_map(scene))
    assert {tuple(c) for c in seg.reshape(-1, 3)} <= {(0, 0, 0)} | {tuple(c) for c in world.COLORS.values()}
    edges = np.asarray(render.canny_map(render.render(scene)))
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) <= {0, 255} and edges.max() == 255


def test_canny_maps_outline_every_shape_on_every_background():
    """Gray is close in luminance to several object colours (green: 8 levels); the world's
    Canny thresholds still draw each shape's outline, and nothing off the shapes."""
    from scipy import ndimage

    rng, backgrounds = random.Random(11), set()
    for _ in range(150):
        scene = captions.sample_pair(rng)[1]
        backgrounds.add(scene.background)
        edges = np.asarray(render.canny_map(render.render(scene)))[..., 0] > 0
        shapes, n = ndimage.label(np.asarray(render.segmentation_map(scene)).max(-1) > 0)
        for k in range(1, n + 1):
            rim = ndimage.binary_dilation(shapes == k) ^ (shapes == k)
            assert edges[ndimage.binary_dilation(shapes == k, iterations=2)].sum() >= rim.sum() / 2
        assert not edges[~ndimage.binary_dilation(shapes > 0, iterations=3)].any()
    assert backgrounds == {"white", "gray", "black"}


def test_geneval_prompt_set_is_fixed_and_excludes_held_out():
    a, b = prompt_set(), prompt_set()
    assert a == b
    cats = {c for c, _ in a}
    assert cats == set(CATEGORIES) | {HELD_OUT}
    for category, prompt in a:
        spec = captions.parse_caption(prompt)
        assert captions.is_held_out(spec) == (category == HELD_OUT)


def test_geneval_scores_renders_perfectly_and_noise_badly():
    def oracle(prompts, seeds):
        return [
            render.render(captions.sample_scene(captions.parse_caption(p), random.Random(s)))
            for p, s in zip(prompts, seeds, strict=True)
        ]

    result = evaluate(oracle, samples_per_prompt=1, per_category=5)
    assert result.overall >= 0.99 and result.per_category[HELD_OUT] == 1.0

    def gray(prompts, seeds):
        from PIL import Image

        return [Image.new("RGB", (64, 64), (128, 128, 128)) for _ in prompts]

    assert evaluate(gray, samples_per_prompt=1, per_category=5).overall == 0.0
