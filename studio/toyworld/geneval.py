"""Toy GenEval: a fixed prompt set in GenEval's categories, scored by the toy-world judge.

Ghosh et al., "GenEval: An Object-Focused Framework for Evaluating Text-to-Image
Alignment" (NeurIPS 2023) scores object-level facts with a detector; here the judge is
exact, so the score is the share of samples whose reading satisfies the prompt. The
overall score is the mean over the six categories, as in GenEval; the held-out
colour-shape-position combinations are scored separately and not in the overall.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from PIL import Image

from .captions import HELD_OUT_COMBOS, RELATIONS, CaptionSpec, ObjectSpec, format_caption, is_held_out
from .judge import satisfies
from .world import COLORS, POSITIONS, SHAPES

CATEGORIES = ("single_object", "position", "size", "two_objects", "relation", "counting")
HELD_OUT = "held_out"
MAX_PER_CATEGORY = len(COLORS) * len(SHAPES)  # distinct single-object prompts: colour × shape


def prompt_set(per_category: int = 12, seed: int = 2024) -> list[tuple[str, str]]:
    """(category, prompt) pairs, the same for every call with the same arguments."""
    if not 1 <= per_category <= MAX_PER_CATEGORY:
        raise ValueError(
            f"toy GenEval has 1 to {MAX_PER_CATEGORY} distinct prompts a category, not {per_category}"
        )
    rng = random.Random(seed)
    colors, shapes = list(COLORS), list(SHAPES)
    makers: dict[str, Callable[[], CaptionSpec]] = {
        "single_object": lambda: CaptionSpec((ObjectSpec(rng.choice(colors), rng.choice(shapes)),)),
        "position": lambda: CaptionSpec(
            (ObjectSpec(rng.choice(colors), rng.choice(shapes), position=rng.choice(POSITIONS)),)
        ),
        "size": lambda: CaptionSpec(
            (ObjectSpec(rng.choice(colors), rng.choice(shapes), size=rng.choice(("small", "large"))),)
        ),
        "two_objects": lambda: CaptionSpec(_two_distinct(rng, colors, shapes), relation="and"),
        "relation": lambda: CaptionSpec(
            _two_distinct(rng, colors, shapes), relation=rng.choice([r for r in RELATIONS if r != "and"])
        ),
        "counting": lambda: (
            lambda n: CaptionSpec((ObjectSpec(rng.choice(colors), rng.choice(shapes)),) * n, count=n)
        )(rng.choice((2, 3))),
    }
    pairs: list[tuple[str, str]] = []
    for category in CATEGORIES:
        seen: set[str] = set()
        while len(seen) < per_category:
            spec = makers[category]()
            text = format_caption(spec)
            if text not in seen and not is_held_out(spec):
                seen.add(text)
                pairs.append((category, text))
    for color, shape, position in HELD_OUT_COMBOS:
        pairs.append((HELD_OUT, format_caption(CaptionSpec((ObjectSpec(color, shape, position=position),)))))
    return pairs


def _two_distinct(rng, colors, shapes) -> tuple[ObjectSpec, ObjectSpec]:
    while True:
        a = ObjectSpec(rng.choice(colors), rng.choice(shapes))
        b = ObjectSpec(rng.choice(colors), rng.choice(shapes))
        if a != b:
            return a, b


@dataclass
class GenEvalResult:
    per_category: dict[str, float]
    overall: float
    samples: int
    rows: list[tuple[str, str, int, bool]] = field(default_factory=list)  # category, prompt, seed, ok


Generate = Callable[[Sequence[str], Sequence[int]], Sequence[Image.Image]]


def evaluate(
    generate: Generate, *, samples_per_prompt: int = 4, per_category: int = 12, batch: int = 32
) -> GenEvalResult:
    """Score `generate(prompts, seeds) -> images` on the toy GenEval prompt set."""
    jobs = [(c, p, s) for c, p in prompt_set(per_category) for s in range(samples_per_prompt)]
    rows = []
    for start in range(0, len(jobs), batch):
        chunk = jobs[start : start + batch]
        images = generate([p for _, p, _ in chunk], [s for _, _, s in chunk])
        rows += [(c, p, s, satisfies(img, p)) for (c, p, s), img in zip(chunk, images, strict=True)]
    per_category = {}
    for category in CATEGORIES + (HELD_OUT,):
        oks = [ok for c, _, _, ok in rows if c == category]
        per_category[category] = sum(oks) / len(oks)
    overall = sum(per_category[c] for c in CATEGORIES) / len(CATEGORIES)
    return GenEvalResult(per_category, overall, len(rows), rows)
