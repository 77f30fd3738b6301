"""Measure the toy ControlNets on held-out scenes, with the judge and the shapes' masks.

A held-out scene (a seed the training never used) is rendered; its Canny edges or its
segmentation map go to the ControlNet with a caption that names the scene's colours and
shapes. A case counts when the generated shapes' mask overlaps the scene's with IoU ≥ 0.7
AND the judge reads the same shapes (kind and colour, as a multiset). Plain txt2img of the
same caption and seed is judged alike, for contrast. `scale_sweep` runs the conditioning
scale from 0 to 1.5: structure-following (share with IoU ≥ 0.7) against prompt-following
(the judge says the picture satisfies the caption).
"""

from __future__ import annotations

import random
from collections import Counter

import numpy as np

from .captions import sample_pair
from .judge import read, satisfies
from .render import canny_map, render, segmentation_map
from .world import BACKGROUNDS

EVAL_SEED = 9090  # toy-sd and its ControlNets train on scenes of seed 3
IOU_BAR = 0.7
MASK_DISTANCE = 60  # a pixel this far (max over channels) from the background is a shape's
MAP_OF = {"canny": lambda scene: canny_map(render(scene)), "seg": segmentation_map}
PREPROCESSOR = {"canny": "canny", "seg": "segmentation_palette"}


def caption_of(scene) -> str:
    """A caption naming every shape's colour and kind, and the background."""
    shapes = scene.shapes
    tail = f" on a {scene.background} background"
    if len(shapes) == 1:
        return f"a {shapes[0].color} {shapes[0].kind}{tail}"
    if len(shapes) == 2:
        a, b = shapes
        return f"a {a.color} {a.kind} and a {b.color} {b.kind}{tail}"
    words = {2: "two", 3: "three"}
    return f"{words[len(shapes)]} {shapes[0].color} {shapes[0].kind}s{tail}"


def held_out_scenes(n: int, seed: int = EVAL_SEED) -> list:
    """Scenes of the training distribution drawn with another seed, those whose shapes a caption can name."""
    rng = random.Random(seed)
    scenes = []
    while len(scenes) < n:
        scene = sample_pair(rng)[1]
        kinds = {(s.kind, s.color) for s in scene.shapes}
        if len(scene.shapes) <= 2 or len(kinds) == 1:
            scenes.append(scene)
    return scenes


def shape_mask(image, background: str) -> np.ndarray:
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    return np.abs(pixels - np.array(BACKGROUNDS[background])).max(-1) > MASK_DISTANCE


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def judge_case(image, scene) -> dict:
    reading = read(image)
    overlap = iou(shape_mask(image, reading.background), shape_mask(render(scene), scene.background))
    same = Counter((s.kind, s.color) for s in reading.shapes) == Counter(
        (s.kind, s.color) for s in scene.shapes
    )
    return {
        "iou": overlap,
        "same_shapes": same,
        "kept": overlap >= IOU_BAR and same,
        "follows": satisfies(reading, caption_of(scene)),
    }


def _summary(cases: list[dict]) -> dict:
    n = len(cases)
    return {
        "kept": round(sum(c["kept"] for c in cases) / n, 4),
        "iou_mean": round(float(np.mean([c["iou"] for c in cases])), 4),
        "iou_at_least_0.7": round(sum(c["iou"] >= IOU_BAR for c in cases) / n, 4),
        "same_shapes": round(sum(c["same_shapes"] for c in cases) / n, 4),
        "follows_prompt": round(sum(c["follows"] for c in cases) / n, 4),
        "n": n,
    }


def controlnet_score(
    manager, model: str, controlnet: str, kind: str, n: int = 100, scale: float = 1.0, **settings
) -> dict:
    """The ControlNet on `n` held-out scenes, and txt2img of the same captions and seeds."""
    from ..controlnet import ControlNetSettings, ControlUnit
    from ..controlnet import run as run_controlnet
    from ..txt2img import Txt2ImgSettings
    from ..txt2img import run as run_txt2img

    controlled, plain = [], []
    for i, scene in enumerate(held_out_scenes(n)):
        caption, seed = caption_of(scene), EVAL_SEED + i
        unit = ControlUnit(model=controlnet, scale=scale, preprocessor="none")
        s = ControlNetSettings(prompt=caption, model=model, seed=seed, units=(unit,), **settings)
        controlled.append(judge_case(run_controlnet(s, [MAP_OF[kind](scene)], manager).images[0], scene))
        plain_image = run_txt2img(
            Txt2ImgSettings(prompt=caption, model=model, seed=seed, **settings), manager
        ).images[0]
        plain.append(judge_case(plain_image, scene))
    return {"controlnet": _summary(controlled), "without_controlnet": _summary(plain)}


def scale_sweep(manager, model: str, controlnet: str, kind: str, scales, n: int = 40) -> list[dict]:
    from ..controlnet import ControlNetSettings, ControlUnit
    from ..controlnet import run as run_controlnet

    scenes = held_out_scenes(n)
    rows = []
    for scale in scales:
        cases = []
        for i, scene in enumerate(scenes):
            unit = ControlUnit(model=controlnet, scale=float(scale), preprocessor="none")
            s = ControlNetSettings(prompt=caption_of(scene), model=model, seed=EVAL_SEED + i, units=(unit,))
            cases.append(judge_case(run_controlnet(s, [MAP_OF[kind](scene)], manager).images[0], scene))
        summary = _summary(cases)
        rows.append(
            {
                "scale": float(scale),
                "structure": summary["iou_at_least_0.7"],
                "prompt": summary["follows_prompt"],
            }
        )
    return rows
