"""Captions of the toy world: a grammar, its parser, and a seeded sampler of (caption, scene).

Grammar (`shared/toyworld.md`):
    one object:   a [small|large] COLOR SHAPE [POSITION] [on a BG background]
    two objects:  a COLOR SHAPE (to the left of|above|and) a COLOR SHAPE [on a BG background]
    counting:     (two|three) COLOR SHAPEs [on a BG background]
`shape` is the generic shape word, and a generic object may leave its colour out.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace

from .world import (
    ALL_SHAPES,
    BACKGROUNDS,
    CANVAS,
    COLORS,
    MARGIN,
    POSITIONS,
    SHAPES,
    SIZE_RANGES,
    Scene,
    Shape,
    apart,
    inside_canvas,
    position_fits,
    relation_fits,
)

RELATIONS = ("to the left of", "above", "and")
# Sampled scenes keep this much room inside the position rules, so that a reading off
# by an anti-aliased pixel still judges a ground-truth render right.
SAMPLING_SLACK = 1.0
COUNT_WORDS = {"two": 2, "three": 3}
GENERIC = "shape"

# Colour-shape-position combinations that never appear in training captions; the
# held-out generalisation score is measured on exactly these.
HELD_OUT_COMBOS = (
    ("purple", "triangle", "on the right"),
    ("orange", "circle", "at the top"),
    ("green", "square", "at the bottom"),
    ("yellow", "triangle", "on the left"),
    ("blue", "circle", "in the center"),
    ("red", "square", "at the top"),
)


@dataclass(frozen=True)
class ObjectSpec:
    """What a caption says of one object; None means the caption leaves it open."""

    color: str | None = None
    shape: str | None = None  # None is the generic word `shape`
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class CaptionSpec:
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None  # for two-object captions
    count: int | None = None  # for counting captions: objects are `count` copies
    background: str | None = None


def format_caption(spec: CaptionSpec) -> str:
    if spec.count is not None:
        obj = spec.objects[0]
        words = [next(w for w, n in COUNT_WORDS.items() if n == spec.count)]
        if obj.color:
            words.append(obj.color)
        words.append((obj.shape or GENERIC) + "s")
    elif spec.relation is not None:
        a, b = spec.objects
        words = [_object_phrase(a), spec.relation, _object_phrase(b)]
    else:
        words = [_object_phrase(spec.objects[0])]
    if spec.background:
        words.append(f"on a {spec.background} background")
    return " ".join(words)


def _object_phrase(obj: ObjectSpec) -> str:
    words = ["a"]
    if obj.size:
        words.append(obj.size)
    if obj.color:
        words.append(obj.color)
    words.append(obj.shape or GENERIC)
    if obj.position:
        words.append(obj.position)
    return " ".join(words)


_COLOR = "|".join(COLORS)
_SHAPE = "|".join(ALL_SHAPES + (GENERIC,))
_BG = "|".join(BACKGROUNDS)
_POS = "|".join(POSITIONS)
_OBJ = rf"a (?:(?P<{{p}}size>small|large) )?(?:(?P<{{p}}color>{_COLOR}) )?(?P<{{p}}shape>{_SHAPE})"
_BG_TAIL = rf"(?: on a (?P<bg>{_BG}) background)?"
_SINGLE = re.compile("^" + _OBJ.format(p="a") + rf"(?: (?P<pos>{_POS}))?" + _BG_TAIL + "$")
_PAIR = re.compile(
    "^" + _OBJ.format(p="a") + r" (?P<rel>to the left of|above|and) " + _OBJ.format(p="b") + _BG_TAIL + "$"
)
_COUNT = re.compile(rf"^(?P<n>two|three) (?:(?P<color>{_COLOR}) )?(?P<shape>{_SHAPE})s" + _BG_TAIL + "$")


def parse_caption(text: str) -> CaptionSpec:
    """Read a caption of the grammar back into a spec; ValueError for anything else."""
    text = " ".join(text.lower().split())
    if m := _SINGLE.match(text):
        obj = ObjectSpec(m["acolor"], _shape(m["ashape"]), m["asize"], m["pos"])
        return CaptionSpec((obj,), background=m["bg"])
    if m := _PAIR.match(text):
        if m["asize"] or m["bsize"]:
            raise ValueError(f"two-object captions take no size words: {text!r}")
        a = ObjectSpec(m["acolor"], _shape(m["ashape"]))
        b = ObjectSpec(m["bcolor"], _shape(m["bshape"]))
        return CaptionSpec((a, b), relation=m["rel"], background=m["bg"])
    if m := _COUNT.match(text):
        n = COUNT_WORDS[m["n"]]
        obj = ObjectSpec(m["color"], _shape(m["shape"]))
        return CaptionSpec((obj,) * n, count=n, background=m["bg"])
    raise ValueError(f"not a toy-world caption: {text!r}")


def _shape(word: str) -> str | None:
    return None if word == GENERIC else word


def is_held_out(spec: CaptionSpec) -> bool:
    return any((o.color, o.shape, o.position) in HELD_OUT_COMBOS for o in spec.objects)


# --------------------------------------------------------------------------- sampling


def sample_spec(
    rng: random.Random, *, generic_share: float = 0.2, allow_held_out: bool = False
) -> CaptionSpec:
    """A random caption of the training distribution (the held-out combos excluded)."""
    while True:
        spec = _sample_spec_once(rng, generic_share)
        if allow_held_out or not is_held_out(spec):
            return spec


def _sample_spec_once(rng: random.Random, generic_share: float) -> CaptionSpec:
    background = rng.choice(list(BACKGROUNDS)) if rng.random() < 0.5 else None
    kind = rng.choices(("single", "pair", "count"), weights=(0.5, 0.3, 0.2))[0]
    if kind == "single":
        obj = ObjectSpec(
            color=rng.choice(list(COLORS)),
            shape=rng.choice(SHAPES),
            size=rng.choice(("small", "large", None, None)),
            position=rng.choice(POSITIONS + (None, None)),
        )
        if rng.random() < generic_share:
            obj = replace(obj, shape=None, color=obj.color if rng.random() < 0.5 else None)
        return CaptionSpec((obj,), background=background)
    if kind == "pair":
        objs = tuple(ObjectSpec(rng.choice(list(COLORS)), rng.choice(SHAPES)) for _ in range(2))
        if rng.random() < generic_share:
            objs = tuple(replace(o, shape=None) for o in objs)
        return CaptionSpec(objs, relation=rng.choice(RELATIONS), background=background)
    n = rng.choice((2, 3))
    obj = ObjectSpec(rng.choice(list(COLORS)), rng.choice(SHAPES))
    return CaptionSpec((obj,) * n, count=n, background=background)


def sample_scene(spec: CaptionSpec, rng: random.Random, *, shape_pool: tuple[str, ...] = SHAPES) -> Scene:
    """A scene that satisfies `spec` exactly: one shape per object, open choices random."""
    background = spec.background or rng.choice(list(BACKGROUNDS))
    for _ in range(1000):
        # A generic `shape` or an open colour is the same choice for every copy in a count.
        first = _fill(spec.objects[0], rng, shape_pool)
        shapes: list[Shape] = []
        for i, obj in enumerate(spec.objects):
            kind, color = first if (spec.count or i == 0) else _fill(obj, rng, shape_pool)
            placed = _place(obj, kind, color, shapes, rng)
            if placed is None:
                break
            shapes.append(placed)
        else:
            if spec.relation and not relation_fits(spec.relation, shapes[0], shapes[1], SAMPLING_SLACK):
                continue
            return Scene(background, tuple(shapes))
    raise RuntimeError(f"could not place {format_caption(spec)!r}")


def _fill(obj: ObjectSpec, rng: random.Random, shape_pool) -> tuple[str, str]:
    return obj.shape or rng.choice(shape_pool), obj.color or rng.choice(list(COLORS))


def _place(obj: ObjectSpec, kind: str, color: str, others: list[Shape], rng: random.Random) -> Shape | None:
    lo, hi = SIZE_RANGES[obj.size]
    for _ in range(50):
        size = rng.randint(lo, hi) if len(others) == 0 else rng.randint(lo, min(hi, 22))
        half = size / 2
        cx = rng.uniform(MARGIN + half, CANVAS - MARGIN - half)
        cy = rng.uniform(MARGIN + half, CANVAS - MARGIN - half)
        cx, cy = round(cx * 2) / 2, round(cy * 2) / 2
        shape = Shape(kind, color, cx, cy, size)
        if not inside_canvas(shape):
            continue
        if obj.position and not position_fits(obj.position, cx, cy, SAMPLING_SLACK):
            continue
        if all(apart(shape, other) for other in others):
            return shape
    return None


def sample_pair(rng: random.Random, **kwargs) -> tuple[str, Scene]:
    spec = sample_spec(rng, **kwargs)
    return format_caption(spec), sample_scene(spec, rng)
