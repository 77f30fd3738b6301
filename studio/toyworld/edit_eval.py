"""Measure the editing techniques on the toy world, with the judge reading both pictures.

* `instruct_pix2pix_score`: held-out (instruction, before) pairs from `edits.sample_edit`
  with a seed the training set never used; an edit counts when the judge finds the named
  change and everything else kept (`edits.edit_followed`), overall and per edit kind.
* `sdedit_recolour`: a one-shape render and the same caption with a new colour, edited
  at one strength; it counts when the judge reads the new colour and the shape's centre
  moved ≤ 4 px. `strength_sweep` runs it over strengths 0 → 1 and reports "kept layout"
  (same shape and background, centre ≤ 4 px) against "follows the prompt" (the judge
  says the picture satisfies the new caption): SDEdit's faithfulness–realism trade-off.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import replace

from .captions import CaptionSpec, ObjectSpec, format_caption, sample_scene
from .edits import EDIT_KINDS, edit_followed, parse_edit, sample_edit
from .judge import read, satisfies
from .render import render
from .world import BACKGROUNDS, COLORS, POSITIONS, SHAPES

EVAL_SEED = 777  # the training stages use other seeds
CENTRE_MOVE = 4.0


def instruct_pix2pix_score(manager, model: str, n: int = 100, seed: int = EVAL_SEED, **settings) -> dict:
    """Share of `n` held-out edits followed, overall and per kind; `settings` go to the IP2P settings."""
    from ..ip2p import InstructPix2PixSettings, run

    rng = random.Random(seed)
    hits, counts = defaultdict(int), defaultdict(int)
    for i in range(n):
        instruction, before, _ = sample_edit(rng)
        picture = render(before)
        s = InstructPix2PixSettings(instruction=instruction, model=model, seed=seed + i, **settings)
        edited = run(s, picture, manager).images[0]
        kind = parse_edit(instruction).kind
        counts[kind] += 1
        hits[kind] += edit_followed(read(picture), edited, instruction)
    report = {"overall": round(float(sum(hits.values())) / n, 4), "n": n}
    report.update({k: round(float(hits[k]) / counts[k], 4) for k in EDIT_KINDS if counts[k]})
    return report


def recolour_cases(n: int, seed: int = EVAL_SEED) -> list[tuple[CaptionSpec, object]]:
    """(target caption, source scene): one shape at a position, the caption with a new colour."""
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        color = rng.choice(list(COLORS))
        spec = CaptionSpec(
            (ObjectSpec(color, rng.choice(SHAPES), None, rng.choice(POSITIONS)),),
            background=rng.choice(list(BACKGROUNDS)),
        )
        new = rng.choice([c for c in COLORS if c != color])
        target = replace(spec, objects=(replace(spec.objects[0], color=new),))
        cases.append((target, sample_scene(spec, rng)))
    return cases


def sdedit_recolour(
    manager, model: str, strength: float, n: int = 100, seed: int = EVAL_SEED, **settings
) -> dict:
    """SDEdit by the recoloured caption: success = new colour and centre moved ≤ 4 px."""
    from ..sdedit import SDEditSettings, run

    success = kept = follows = 0
    for i, (target, scene) in enumerate(recolour_cases(n, seed)):
        prompt = format_caption(target)
        s = SDEditSettings(prompt=prompt, model=model, strength=strength, seed=seed + i, **settings)
        edited = run(s, render(scene), manager).images[0]
        reading = read(edited)
        original = scene.shapes[0]
        seen = reading.shapes[0] if len(reading.shapes) == 1 else None
        stayed = seen is not None and math.dist((seen.cx, seen.cy), (original.cx, original.cy)) <= CENTRE_MOVE
        kept += stayed and seen.kind == original.kind and reading.background == scene.background
        follows += satisfies(reading, target)
        success += stayed and seen.color == target.objects[0].color
    return {
        "strength": strength,
        "success": round(float(success) / n, 4),
        "kept_layout": round(float(kept) / n, 4),
        "follows_prompt": round(float(follows) / n, 4),
        "n": n,
    }


def strength_sweep(manager, model: str, strengths=None, n: int = 40, **settings) -> list[dict]:
    strengths = strengths or [i / 10 for i in range(11)]
    return [sdedit_recolour(manager, model, s, n=n, **settings) for s in strengths]
