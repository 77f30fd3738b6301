"""Measure a toy IP-Adapter with the judge: does the picture take the reference's shape and
colour, and the prompt's position?

A case is a held-out reference (one shape of a random colour, kind, size, place and
background, drawn with a seed the training never used) and a prompt that names only a
position ("a shape on the left"). The judge reads the generated picture; the case counts
for shape + colour when it reads exactly one shape of the reference's kind and colour, for
position when that one shape's centre fits the prompted position, and jointly when both
hold. `scale_sweep` runs the adapter's λ (0 is the prompt alone). `geneval_with_references`
scores prompt-following: toy GenEval's prompts, each with a reference that agrees with it
(a render of a scene sampled for the caption), so that an image prompt that garbles the
text's positions, counts or relations loses points.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

from .captions import CaptionSpec, ObjectSpec, parse_caption, sample_scene
from .judge import read
from .render import render
from .world import BACKGROUNDS, COLORS, POSITIONS, SHAPES, position_fits

EVAL_SEED = 7171  # the adapter trains on scenes of seed 71


@dataclass(frozen=True)
class Case:
    reference: object  # the Scene of the reference picture
    position: str

    @property
    def prompt(self) -> str:
        return f"a shape {self.position}"


def cases(n: int, seed: int = EVAL_SEED) -> list[Case]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        obj = ObjectSpec(rng.choice(list(COLORS)), rng.choice(SHAPES))
        scene = sample_scene(CaptionSpec((obj,), background=rng.choice(list(BACKGROUNDS))), rng)
        out.append(Case(scene, rng.choice(POSITIONS)))
    return out


def judge_case(image, case: Case) -> dict:
    shapes = read(image).shapes
    want = case.reference.shapes[0]
    one = len(shapes) == 1
    same = one and shapes[0].kind == want.kind and shapes[0].color == want.color
    placed = one and bool(position_fits(case.position, shapes[0].cx, shapes[0].cy))
    return {"shape_colour": same, "position": placed, "joint": same and placed}


def summary(rows: list[dict]) -> dict:
    n = len(rows)
    return {k: round(sum(r[k] for r in rows) / n, 4) for k in ("shape_colour", "position", "joint")} | {
        "n": n
    }


def generate_with_references(
    manager,
    model: str,
    adapter: str,
    prompts,
    references,
    seeds,
    *,
    scale: float,
    steps: int = 25,
    guidance: float = 4.0,
    concatenated: bool = False,
) -> list:
    """Prompt i with reference picture i, one pipeline call each, as the studio's IP-Adapter
    run makes it (the pipeline embeds the reference; guidance's unconditional branch gets a zero
    embedding). Not one batched call: diffusers repeats `ip_adapter_image_embeds` for every
    prompt of a call, so a batch of references would put ALL of them into every picture's
    image attention, and every picture would take the batch's mixed colour."""
    import torch

    from ..schedulers import make_scheduler

    with manager.lend(model, ip_adapters=(adapter,)) as pipe:
        if concatenated:
            from .train.ip_adapter import use_concatenated_attention

            use_concatenated_attention(pipe.unet)
        spec = manager.resolve(model)
        pipe.scheduler = make_scheduler(spec.defaults.get("scheduler", "DDIM"), "sd", pipe.scheduler.config)
        pipe.set_ip_adapter_scale(scale)
        images = []
        for prompt, reference, seed in zip(prompts, references, seeds, strict=True):
            images += pipe(
                prompt,
                ip_adapter_image=reference,
                num_inference_steps=steps,
                guidance_scale=guidance,
                width=64,
                height=64,
                generator=torch.Generator("cpu").manual_seed(seed),
            ).images
        return images


def reference_score(
    manager,
    model: str,
    adapter: str,
    n: int = 100,
    *,
    scale: float = 1.0,
    concatenated: bool = False,
    **kwargs,
) -> dict:
    """Shape + colour, position and joint rates over `n` held-out cases."""
    all_cases = cases(n)
    images = generate_with_references(
        manager,
        model,
        adapter,
        [c.prompt for c in all_cases],
        [render(c.reference) for c in all_cases],
        range(n),
        scale=scale,
        concatenated=concatenated,
        **kwargs,
    )
    rows = [judge_case(img, c) for img, c in zip(images, all_cases, strict=True)]
    return summary(rows)


def scale_sweep(manager, model: str, adapter: str, scales, n: int = 100, **kwargs) -> dict[float, dict]:
    return {s: reference_score(manager, model, adapter, n, scale=s, **kwargs) for s in scales}


def geneval_with_references(
    manager,
    model: str,
    adapter: str,
    *,
    scale: float = 1.0,
    samples: int = 1,
    per_category: int = 12,
    concatenated: bool = False,
) -> dict:
    """Toy GenEval with an agreeing reference per prompt (see the module docstring)."""
    from .geneval import evaluate

    def generate(prompts, seeds):
        references = []
        for prompt, seed in zip(prompts, seeds, strict=True):
            rng = random.Random(EVAL_SEED * 7 + seed * 1000 + zlib.crc32(prompt.encode()) % 1000)
            references.append(render(sample_scene(parse_caption(prompt), rng)))
        return generate_with_references(
            manager, model, adapter, prompts, references, seeds, scale=scale, concatenated=concatenated
        )

    result = evaluate(generate, samples_per_prompt=samples, per_category=per_category)
    return {"overall": round(result.overall, 4), **{k: round(v, 4) for k, v in result.per_category.items()}}
