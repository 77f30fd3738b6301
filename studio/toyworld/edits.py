"""Instruction edits of the toy world: grammar, sampler of (instruction, before, after), and judging.

Grammar (`shared/toyworld.md`, "Edits"):
    make the SHAPE COLOR              recolour that shape
    turn the SHAPE into a SHAPE       same colour, position and size, new shape
    make the background BG
An edit keeps everything it does not name. The sampler only names a shape that occurs
once in the scene, so every instruction has one meaning.

`edit_followed(before, after, instruction)` is the judge of an edit: it reads both
pictures back into the world and checks that the named change happened and that every
other shape kept its colour, shape, size (±3 px) and centre (±4 px), and the background.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace

from .captions import sample_pair
from .judge import Reading, SeenShape, read
from .world import BACKGROUNDS, COLORS, SHAPES, Scene

EDIT_KINDS = ("recolor", "reshape", "background")
CENTRE_TOLERANCE = 4.0  # px a kept shape's centre may move
SIZE_TOLERANCE = 3.0  # px a kept shape's bounding box may change

_COLOR = "|".join(COLORS)
_SHAPE = "|".join(SHAPES)
_RECOLOR = re.compile(rf"^make the (?P<shape>{_SHAPE}) (?P<color>{_COLOR})$")
_RESHAPE = re.compile(rf"^turn the (?P<shape>{_SHAPE}) into a (?P<new>{_SHAPE})$")
_BACKGROUND = re.compile(rf"^make the background (?P<bg>{'|'.join(BACKGROUNDS)})$")


@dataclass(frozen=True)
class Edit:
    kind: str  # one of EDIT_KINDS
    shape: str | None = None  # the shape the edit names (recolor, reshape)
    value: str = ""  # the new colour, shape or background


def format_edit(edit: Edit) -> str:
    if edit.kind == "recolor":
        return f"make the {edit.shape} {edit.value}"
    if edit.kind == "reshape":
        return f"turn the {edit.shape} into a {edit.value}"
    return f"make the background {edit.value}"


def parse_edit(text: str) -> Edit:
    text = " ".join(text.lower().split())
    if m := _RECOLOR.match(text):
        return Edit("recolor", m["shape"], m["color"])
    if m := _RESHAPE.match(text):
        return Edit("reshape", m["shape"], m["new"])
    if m := _BACKGROUND.match(text):
        return Edit("background", None, m["bg"])
    raise ValueError(f"not a toy-world edit instruction: {text!r}")


def apply_edit(scene: Scene, edit: Edit) -> Scene:
    """The scene after `edit`; the named shape must occur exactly once."""
    if edit.kind == "background":
        return replace(scene, background=edit.value)
    targets = [i for i, s in enumerate(scene.shapes) if s.kind == edit.shape]
    if len(targets) != 1:
        raise ValueError(f"the scene has {len(targets)} {edit.shape}s; an edit must name exactly one")
    shapes = list(scene.shapes)
    old = shapes[targets[0]]
    shapes[targets[0]] = (
        replace(old, color=edit.value) if edit.kind == "recolor" else replace(old, kind=edit.value)
    )
    return replace(scene, shapes=tuple(shapes))


def sample_edit(rng: random.Random) -> tuple[str, Scene, Scene]:
    """A random (instruction, before, after) triple; the before scene is a base-model training scene."""
    while True:
        _, before = sample_pair(rng)
        kind = rng.choice(EDIT_KINDS)
        if kind == "background":
            edit = Edit("background", None, rng.choice([b for b in BACKGROUNDS if b != before.background]))
            return format_edit(edit), before, apply_edit(before, edit)
        kinds = [s.kind for s in before.shapes]
        unique = [s for s in before.shapes if kinds.count(s.kind) == 1]
        if not unique:
            continue
        target = rng.choice(unique)
        if kind == "recolor":
            edit = Edit("recolor", target.kind, rng.choice([c for c in COLORS if c != target.color]))
        else:
            edit = Edit("reshape", target.kind, rng.choice([k for k in SHAPES if k != target.kind]))
        return format_edit(edit), before, apply_edit(before, edit)


# --------------------------------------------------------------------------- judging


def edit_followed(before, after, instruction: str | Edit) -> bool:
    """Did `after` apply the instruction to `before` and keep everything else? Images or Readings."""
    edit = parse_edit(instruction) if isinstance(instruction, str) else instruction
    b = before if isinstance(before, Reading) else read(before)
    a = after if isinstance(after, Reading) else read(after)
    if len(a.shapes) != len(b.shapes):
        return False
    expected_bg = edit.value if edit.kind == "background" else b.background
    if a.background != expected_bg:
        return False
    pairs = _match_by_centre(b.shapes, a.shapes)
    if pairs is None:
        return False
    if edit.kind != "background" and sum(s.kind == edit.shape for s in b.shapes) != 1:
        return False  # the before picture doesn't single the shape out
    for old, new in pairs:
        if abs(old.size - new.size) > SIZE_TOLERANCE:
            return False
        want_kind, want_color = old.kind, old.color
        if edit.kind != "background" and old.kind == edit.shape:
            if edit.kind == "recolor":
                want_color = edit.value
            else:
                want_kind = edit.value
        if (new.kind, new.color) != (want_kind, want_color):
            return False
    return True


def _match_by_centre(before: tuple[SeenShape, ...], after: tuple[SeenShape, ...]):
    """Pair every shape with the nearest one in the other reading, within CENTRE_TOLERANCE."""
    pairs, taken = [], set()
    for old in before:
        best = min(
            (i for i in range(len(after)) if i not in taken),
            key=lambda i: (after[i].cx - old.cx) ** 2 + (after[i].cy - old.cy) ** 2,
            default=None,
        )
        if best is None:
            return None
        new = after[best]
        if max(abs(new.cx - old.cx), abs(new.cy - old.cy)) > CENTRE_TOLERANCE:
            return None
        taken.add(best)
        pairs.append((old, new))
    return pairs
