"""Measure Prompt-to-Prompt on the toy world, with the judge reading both pictures.

* `word_swap`: one-shape prompts ("a red circle on the left [on a gray background]") whose
  shape word or colour word is swapped. A case counts when the judge reads exactly one
  shape in each picture, the edited one has the new word, and the other attribute, the
  background and the centre (≤ 4 px on each axis) are the source's. The same cases are
  judged for plain regeneration too: txt2img of the edited prompt with the same seed,
  against the source picture, which is what a user gets without attention control.
  With `local_blend`, each case is blended on its object's words (Hertz et al. §3.3):
  the old and the new shape word for a shape swap, the shape word for a colour swap.
* `reweight_sweep`: one prompt, one colour word, its attention factor swept; the share of
  the picture's pixels nearest to that colour (mean and standard error over seeds), and
  how many shapes the judge reads (a share can also grow by shapes the prompt never named).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from .captions import CaptionSpec, ObjectSpec, format_caption
from .judge import read
from .world import BACKGROUNDS, CANVAS, COLORS, POSITIONS, SHAPES

EVAL_SEED = 4242
CENTRE_MOVE = 4.0


@dataclass(frozen=True)
class SwapCase:
    prompt: str
    edit_prompt: str
    attribute: str  # "shape" or "color"
    new: str  # the swapped-in word
    seed: int
    shape: str  # the source's shape word

    @property
    def blend_words(self) -> tuple[str, ...]:
        """The object's words, as a user would blend on them: both shape words, or the one shape."""
        return (self.shape, self.new) if self.attribute == "shape" else (self.shape,)


def swap_cases(n: int, seed: int = EVAL_SEED) -> list[SwapCase]:
    """Alternately a shape swap and a colour swap of a one-shape prompt with a position."""
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        position = rng.choice(POSITIONS)
        background = rng.choice([None, *BACKGROUNDS])
        source = ObjectSpec(color, shape, None, position)
        if i % 2 == 0:
            attribute, new = "shape", rng.choice([s for s in SHAPES if s != shape])
            edited = ObjectSpec(color, new, None, position)
        else:
            attribute, new = "color", rng.choice([c for c in COLORS if c != color])
            edited = ObjectSpec(new, shape, None, position)
        cases.append(
            SwapCase(
                format_caption(CaptionSpec((source,), background=background)),
                format_caption(CaptionSpec((edited,), background=background)),
                attribute,
                new,
                seed + i,
                shape,
            )
        )
    return cases


def swap_kept(source_image, edited_image, case: SwapCase) -> bool:
    """The named attribute changed to `case.new`; the other one, background and centre kept."""
    before, after = read(source_image), read(edited_image)
    if len(before.shapes) != 1 or len(after.shapes) != 1 or before.background != after.background:
        return False
    a, b = before.shapes[0], after.shapes[0]
    if abs(a.cx - b.cx) > CENTRE_MOVE or abs(a.cy - b.cy) > CENTRE_MOVE:
        return False
    if case.attribute == "shape":
        return b.kind == case.new and b.color == a.color
    return b.color == case.new and b.kind == a.kind


def word_swap(
    manager,
    model: str,
    n: int = 50,
    seed: int = EVAL_SEED,
    local_blend: bool = False,
    regenerate: bool = True,
    **settings,
) -> dict:
    """Share of `n` swaps that keep everything else, with P2P (blended on each case's
    `blend_words` if `local_blend`) and, if `regenerate`, with plain regeneration. Blending
    leaves the source picture alone, so one regeneration serves every blend of the same cases."""
    from ..p2p import PromptToPromptSettings
    from ..p2p import run as run_p2p
    from ..txt2img import Txt2ImgSettings
    from ..txt2img import run as run_txt2img

    hits = {"p2p": 0, "regenerate": 0} if regenerate else {"p2p": 0}
    by_attribute = {"shape": [0, 0], "color": [0, 0]}
    for case in swap_cases(n, seed):
        s = PromptToPromptSettings(
            prompt=case.prompt,
            edit_prompt=case.edit_prompt,
            model=model,
            seed=case.seed,
            local_blend=case.blend_words if local_blend else (),
            **settings,
        )
        result = run_p2p(s, manager)
        source, edited = result.images
        kept = swap_kept(source, edited, case)
        hits["p2p"] += kept
        if regenerate:
            plain = Txt2ImgSettings(
                prompt=case.edit_prompt,
                model=model,
                seed=case.seed,
                steps=result.settings.steps,
                guidance=result.settings.guidance,
                scheduler=result.settings.scheduler,
            )
            hits["regenerate"] += swap_kept(source, run_txt2img(plain, manager).images[0], case)
        by_attribute[case.attribute][0] += kept
        by_attribute[case.attribute][1] += 1
    report = {name: round(count / n, 4) for name, count in hits.items()}
    report.update({f"p2p {k}": round(h / max(1, c), 4) for k, (h, c) in by_attribute.items()})
    report["n"] = n
    return report


def color_share(image, color: str) -> float:
    """Share of pixels whose nearest palette colour (backgrounds and objects) is `color`."""
    palette = {**BACKGROUNDS, **COLORS}
    names = list(palette)
    table = np.array([palette[k] for k in names], dtype=np.float32)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 1, 3)
    nearest = ((pixels - table[None]) ** 2).sum(-1).argmin(-1)
    return float((nearest == names.index(color)).mean())


def reweight_sweep(
    manager, model: str, prompt: str, word: str, factors, seeds, share_of: str | None = None, **settings
) -> dict[float, dict[str, float]]:
    """Per factor: the mean `share` of `word`'s colour in the reweighted image and its standard
    error `se` over the seeds, the mean number of `shapes` the judge reads, and from the second
    factor on the `rise` of the share from the previous factor, seed by seed, with its `rise_se`."""
    from ..p2p import PromptToPromptSettings, Reweight, run

    sweep, previous = {}, None
    for factor in factors:
        shares, shapes = [], []
        for seed in seeds:
            s = PromptToPromptSettings(
                prompt=prompt,
                mode="reweight",
                reweight=(Reweight(word, float(factor)),),
                model=model,
                seed=seed,
                **settings,
            )
            image = run(s, manager).images[1]
            shares.append(color_share(image, share_of or word))
            shapes.append(len(read(image).shapes))
        shares = np.array(shares)
        row = {"share": round(float(shares.mean()), 4), "se": _rounded_error(shares)}
        row["shapes"] = round(float(np.mean(shapes)), 2)
        if previous is not None:
            row["rise"] = round(float((shares - previous).mean()), 4)
            row["rise_se"] = _rounded_error(shares - previous)
        sweep[float(factor)], previous = row, shares
    return sweep


def is_non_decreasing(sweep: dict[float, dict[str, float]], errors: float = 2.0, pixels: int = 4) -> bool:
    """Whether no step of a `reweight_sweep` lowers the share by more than `errors` standard
    errors of its seed-by-seed rise, or by more than `pixels` of the toy canvas where that
    error is smaller (a plateau, where the colour already fills its shape, passes)."""
    floor = pixels / (CANVAS * CANVAS)
    return all(row["rise"] >= -max(errors * row["rise_se"], floor) for row in sweep.values() if "rise" in row)


def _rounded_error(values: np.ndarray) -> float:
    """`metrics.standard_error` to 4 places; 0 for a single seed."""
    from ..metrics import standard_error

    return round(standard_error(values.tolist()), 4) if len(values) > 1 else 0.0
