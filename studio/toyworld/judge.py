"""The toy-world judge: read a picture back into the world and check it against a caption.

1. The background word is the palette background nearest to the median border pixel.
2. Every pixel is labelled with its nearest colour among that background and the six
   object colours; non-background pixels form 4-connected components (specks dropped).
3. Each component's colour is the majority label of its pixels; its bounding box gives
   size (side) and centre; its shape is the nearest prototype in (fill ratio of the
   box, vertical offset of the mass centre) space: square (1, 0), circle (pi/4, 0),
   triangle (1/2, 1/6), star (about 0.35, 0.05).
A picture satisfies a caption when there is a one-to-one assignment of the caption's
objects to the components that fits every named word (colour, shape, size, position,
relation, background) and no component is left over.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from .captions import CaptionSpec, ObjectSpec, parse_caption
from .world import BACKGROUNDS, COLORS, position_fits, relation_fits, size_word_fits

MIN_AREA = 24  # px; the smallest star in the world covers about 50
SIZE_TOLERANCE = 1.0  # px; bounding boxes are read from anti-aliased pixels
# (fill ratio of the box, share of the four corner triangles filled, mass-centre offset)
PROTOTYPES = {
    "square": (1.0, 1.0, 0.0),
    "circle": (0.785, 0.0, 0.0),
    "triangle": (0.5, 0.5, 0.167),
    "star": (0.35, 0.0, 0.05),
}
WEIGHTS = (1.0, 0.5, 2.0)
CORNER = 0.25  # u + v below this (u, v in [0, 1] from each corner) is a corner triangle


@dataclass(frozen=True)
class SeenShape:
    kind: str
    color: str
    cx: float
    cy: float
    size: float
    area: int


@dataclass(frozen=True)
class Reading:
    background: str
    shapes: tuple[SeenShape, ...]


def read(image: Image.Image) -> Reading:
    px = np.asarray(image.convert("RGB").resize((64, 64)) if image.size != (64, 64) else image.convert("RGB"))
    px = px.astype(np.float32)
    border = np.concatenate([px[0], px[-1], px[:, 0], px[:, -1]])
    bg_rgb = np.median(border, axis=0)
    background = _nearest(bg_rgb, BACKGROUNDS)

    names = list(COLORS)
    palette = np.array([BACKGROUNDS[background]] + [COLORS[n] for n in names], dtype=np.float32)
    labels = np.argmin(((px[:, :, None, :] - palette[None, None]) ** 2).sum(-1), axis=-1)
    components, n = ndimage.label(labels > 0)
    shapes = []
    for index in range(1, n + 1):
        ys, xs = np.nonzero(components == index)
        if len(xs) < MIN_AREA:
            continue
        color = names[np.bincount(labels[ys, xs] - 1, minlength=len(names)).argmax()]
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        w, h = x1 - x0, y1 - y0
        features = _shape_features(xs, ys, x0, y0, w, h)
        kind = min(PROTOTYPES, key=lambda k: _distance(features, PROTOTYPES[k]))
        shapes.append(SeenShape(kind, color, (x0 + x1) / 2, (y0 + y1) / 2, float(max(w, h)), len(xs)))
    return Reading(background, tuple(shapes))


def _shape_features(xs, ys, x0, y0, w, h) -> tuple[float, float, float]:
    fill = len(xs) / (w * h)
    offset = ((ys + 0.5).mean() - (y0 + h / 2)) / h
    mask = np.zeros((h, w), dtype=bool)
    mask[ys - y0, xs - x0] = True
    u = (np.arange(w) + 0.5) / w
    v = (np.arange(h) + 0.5) / h
    uu, vv = np.meshgrid(np.minimum(u, 1 - u), np.minimum(v, 1 - v))
    corners = uu + vv < CORNER
    corner_fill = mask[corners].mean() if corners.any() else 0.0
    return fill, float(corner_fill), float(offset)


def _distance(features, prototype) -> float:
    return sum((wt * (f - p)) ** 2 for wt, f, p in zip(WEIGHTS, features, prototype, strict=True))


def _nearest(rgb, table: dict) -> str:
    return min(table, key=lambda k: float(((np.asarray(table[k], dtype=np.float32) - rgb) ** 2).sum()))


def satisfies(image_or_reading, caption: str | CaptionSpec) -> bool:
    spec = parse_caption(caption) if isinstance(caption, str) else caption
    reading = image_or_reading if isinstance(image_or_reading, Reading) else read(image_or_reading)
    if spec.background and reading.background != spec.background:
        return False
    if len(reading.shapes) != len(spec.objects):
        return False
    for order in itertools.permutations(reading.shapes):
        if all(_fits(o, s) for o, s in zip(spec.objects, order, strict=True)):
            if spec.relation is None or relation_fits(spec.relation, order[0], order[1]):
                return True
    return False


def _fits(obj: ObjectSpec, seen: SeenShape) -> bool:
    if obj.color and obj.color != seen.color:
        return False
    if obj.shape and obj.shape != seen.kind:
        return False
    if obj.size and not size_word_fits(obj.size, seen.size, SIZE_TOLERANCE):
        return False
    return not (obj.position and not position_fits(obj.position, seen.cx, seen.cy))
