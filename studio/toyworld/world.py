"""The toy world's vocabulary and scene model, as fixed by `shared/toyworld.md`.

A scene is a background word and 1-3 shapes; every rule that decides whether a scene
fits a phrase (size words, position phrases, relations) lives here so that the caption
sampler, the renderer and the judge agree by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

CANVAS = 64
MARGIN = 2  # shapes stay at least this far inside the border
GAP = 2  # and at least this far apart

BACKGROUNDS = {"white": (255, 255, 255), "gray": (128, 128, 128), "black": (0, 0, 0)}
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 90, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 190),
    "orange": (240, 130, 30),
}
SHAPES = ("circle", "square", "triangle")
COLOR_SHAPES = tuple((c, s) for c in COLORS for s in SHAPES)  # the 18 colour-shape pairs
HELD_OUT_SHAPE = "star"  # never in the base models' training data
ALL_SHAPES = SHAPES + (HELD_OUT_SHAPE,)

SIZE_RANGES = {"small": (12, 16), "large": (24, 30), None: (12, 30)}
POSITIONS = ("on the left", "on the right", "at the top", "at the bottom", "in the center")
RELATION_GAP = 8


@dataclass(frozen=True)
class Shape:
    """One flat shape: `size` is the side of its bounding box, (cx, cy) that box's centre."""

    kind: str
    color: str
    cx: float
    cy: float
    size: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        half = self.size / 2
        return (self.cx - half, self.cy - half, self.cx + half, self.cy + half)


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]


def size_word_fits(word: str | None, size: float, tolerance: float = 0.0) -> bool:
    lo, hi = SIZE_RANGES[word]
    return lo - tolerance <= size <= hi + tolerance


def position_fits(phrase: str, cx: float, cy: float, slack: float = 0.0) -> bool:
    """The contract's position rules; a positive `slack` demands that much room inside them."""
    if phrase == "on the left":
        return cx <= 24 - slack
    if phrase == "on the right":
        return cx >= 40 + slack
    if phrase == "at the top":
        return cy <= 24 - slack
    if phrase == "at the bottom":
        return cy >= 40 + slack
    if phrase == "in the center":
        return 24 + slack <= cx <= 40 - slack and 24 + slack <= cy <= 40 - slack
    raise ValueError(f"unknown position phrase {phrase!r}")


def relation_fits(relation: str, a, b, slack: float = 0.0) -> bool:
    if relation == "to the left of":
        return a.cx + RELATION_GAP + slack <= b.cx
    if relation == "above":
        return a.cy + RELATION_GAP + slack <= b.cy
    if relation == "and":
        return True
    raise ValueError(f"unknown relation {relation!r}")


def inside_canvas(shape: Shape) -> bool:
    x0, y0, x1, y1 = shape.box
    return x0 >= MARGIN and y0 >= MARGIN and x1 <= CANVAS - MARGIN and y1 <= CANVAS - MARGIN


def apart(a: Shape, b: Shape) -> bool:
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return ax1 + GAP <= bx0 or bx1 + GAP <= ax0 or ay1 + GAP <= by0 or by1 + GAP <= ay0
