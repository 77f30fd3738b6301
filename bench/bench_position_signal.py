"""How much of a position word a toy model puts into its first sampling step, against the data.

    python bench/bench_position_signal.py [--models toy-sd toy-sd3] [--noises 32] [--scenes 64]
                                          [--oracle-steps 0 3 6 10] [--samples 4]

Toy GenEval's position score (issue 3) said that toy models put a shape wherever the seed
put it (toy-sd did so until its recipe gained a position head: bench_caption_reading.py).
This bench asks why (its first part in seconds, not a GenEval run). At the first step of
sampling the latent is pure noise, so the model's prediction of the clean latent x̂_0 is all
it can contribute to the layout: averaged over noises, a model that follows "on the left"
must predict more shape on the left than for "on the right". The data says how much more:
the mean latent of rendered scenes captioned "… on the left" minus that of "… on the right"
(the model's own VAE and latent scaling), which is what x̂_0 tends to at zero SNR
(E[z_0 | caption], Ho et al. 2020 eq. 14 read as a regression).

For position pairs (left / right, top / bottom) and, as a reference, a colour pair (red /
blue: a change the models do learn at this noise), it prints the model's mean x̂_0
difference (classifier-free guidance at the model's default scale, the same noises for both
captions) as a share of the data's (`ratio`: about the guidance scale when the model has the
data's prior, since guidance multiplies the contrast; 0 = none of it), and the cosine
between the two differences (1 = the same spatial pattern; near 0 = nothing in common).
x̂_0 comes from the first timestep of the model's own scheduler at 25 steps: for ε-prediction
x̂_0 = (z_t − √(1−ᾱ) ε̂)/√ᾱ, for v-prediction √ᾱ z_t − √(1−ᾱ) v̂, for rectified flow z_t − σ v̂.

The oracle (UNet models) asks what learning that prior would buy: DDIM at 25 steps on toy
GenEval's position prompts, where in the first K steps the model's x̂_0 is replaced by the
data's guided prior E[z_0] + w (E[z_0 | caption] − E[z_0]) (w: the guidance scale) and ε̂
recomputed from it (DDIM's own consistency, Song et al. 2021 eq. 12). K = 0 is the model
alone in the same loop; the judge scores every picture. Beside it, chance: renders of each
prompt with its position phrase left out, judged against the prompt.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

OBJECTS = ("red circle", "blue square", "green triangle", "yellow circle")
PAIRS = {
    "left / right": ("a {} on the left on a white background", "a {} on the right on a white background"),
    "top / bottom": ("a {} at the top on a white background", "a {} at the bottom on a white background"),
}
COLOUR_PAIR = ("a red {} on a white background", "a blue {} on a white background")
COLOUR_SHAPES = ("circle", "square", "triangle")


def mean_latent(pipe, pictures):
    """Mean latent of `pictures` in the model's own latent space (its VAE, shift and scaling)."""
    import torch

    from studio.toyworld.train.common import images_to_tensor

    with torch.no_grad():
        z = pipe.vae.encode(images_to_tensor(pictures)).latent_dist.mode()
    config = pipe.vae.config
    return ((z - (getattr(config, "shift_factor", None) or 0.0)) * config.scaling_factor).mean(0)


def data_latents(pipe, caption: str, scenes: int, seed: int):
    """Mean latent of `scenes` renders of `caption`."""
    from studio.toyworld.captions import parse_caption, sample_scene
    from studio.toyworld.render import render

    rng = random.Random(seed)
    return mean_latent(pipe, [render(sample_scene(parse_caption(caption), rng)) for _ in range(scenes)])


def clean_and_noise(scheduler, z, out, t):
    """(x̂_0, ε̂) from a UNet's output at timestep t, for ε- or v-prediction."""
    a = scheduler.alphas_cumprod[int(t)]
    if scheduler.config.prediction_type == "v_prediction":
        return a.sqrt() * z - (1 - a).sqrt() * out, (1 - a).sqrt() * z + a.sqrt() * out
    return (z - (1 - a).sqrt() * out) / a.sqrt(), out


def oracle_position_score(pipe, prompts, seeds, k: int, guidance: float, priors, steps: int = 25) -> float:
    """Share of (prompt, seed) pictures the judge accepts when the first `k` DDIM steps take
    x̂_0 from `priors[prompt]` instead of the model."""
    import torch

    from studio.toyworld.judge import satisfies

    scheduler, unet, ok = pipe.scheduler, pipe.unet, 0
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    with torch.no_grad():
        for prompt in prompts:
            cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, True, negative_prompt="")
            context = torch.cat([uncond, cond])
            for seed in seeds:
                z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
                for i, t in enumerate(timesteps):
                    out_u, out_c = unet(torch.cat([z, z]), t, encoder_hidden_states=context).sample.chunk(2)
                    x0, eps = clean_and_noise(scheduler, z, out_u + guidance * (out_c - out_u), t)
                    if i < k:
                        a = scheduler.alphas_cumprod[int(t)]
                        x0 = priors[prompt][None]
                        eps = (z - a.sqrt() * x0) / (1 - a).sqrt()
                    a_next = (
                        scheduler.alphas_cumprod[int(timesteps[i + 1])] if i + 1 < len(timesteps) else 1.0
                    )
                    z = a_next**0.5 * x0 + (1 - a_next) ** 0.5 * eps
                picture = pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample
                ok += satisfies(pipe.image_processor.postprocess(picture, output_type="pil")[0], prompt)
    return ok / (len(prompts) * len(seeds))


def chance_position_score(prompts, samples: int = 64) -> float:
    """Share of renders of each prompt without its position phrase (the shape anywhere that
    fits) that the judge accepts for the prompt: what ignoring the position word scores."""
    from studio.toyworld.captions import parse_caption, sample_scene
    from studio.toyworld.judge import satisfies
    from studio.toyworld.render import render
    from studio.toyworld.world import POSITIONS

    rng, ok = random.Random(11), 0
    for prompt in prompts:
        bare = parse_caption(next(prompt.replace(" " + p, "") for p in POSITIONS if p in prompt))
        ok += sum(satisfies(render(sample_scene(bare, rng)), prompt) for _ in range(samples))
    return ok / (len(prompts) * samples)


def guided_priors(pipe, prompts, scenes: int, guidance: float, world: int = 1024) -> dict:
    """E[z_0] + w (E[z_0 | prompt] − E[z_0]) for each prompt; E[z_0] over `world` renders of
    the world's own caption distribution."""
    from studio.toyworld.captions import sample_pair
    from studio.toyworld.render import render

    rng, batches = random.Random(7), range(0, world, 256)
    unconditional = sum(mean_latent(pipe, [render(sample_pair(rng)[1]) for _ in range(256)]) for _ in batches)
    unconditional = unconditional / len(batches)
    return {
        p: unconditional + guidance * (data_latents(pipe, p, scenes, seed=300 + i) - unconditional)
        for i, p in enumerate(prompts)
    }


def first_step_x0(pipe, caption: str, noise, guidance: float, steps: int = 25):
    """Mean over `noise` of the model's guided x̂_0 at the first sampling step."""
    import torch

    n = len(noise)
    pipe.scheduler.set_timesteps(steps)
    t = pipe.scheduler.timesteps[0]
    with torch.no_grad():
        if hasattr(pipe, "transformer"):  # SD3: rectified flow, z_t = (1 − σ) z_0 + σ ε, v = ε − z_0
            cond, uncond, pooled, pooled_uncond = pipe.encode_prompt(
                caption, None, None, negative_prompt="", do_classifier_free_guidance=True
            )
            v_c, v_u = (
                pipe.transformer(
                    noise,
                    encoder_hidden_states=c.expand(n, -1, -1),
                    pooled_projections=p.expand(n, -1),
                    timestep=t.expand(n),
                ).sample
                for c, p in ((cond, pooled), (uncond, pooled_uncond))
            )
            sigma = pipe.scheduler.sigmas[0]
            return (noise - sigma * (v_u + guidance * (v_c - v_u))).mean(0)
        cond, uncond = pipe.encode_prompt(caption, "cpu", 1, True, negative_prompt="")
        out_c, out_u = (
            pipe.unet(noise, t, encoder_hidden_states=c.expand(n, -1, -1)).sample for c in (cond, uncond)
        )
        return clean_and_noise(pipe.scheduler, noise, out_u + guidance * (out_c - out_u), t)[0].mean(0)


def compare(pipe, pair, fill, noise, guidance, scenes) -> tuple[float, float]:
    """(ratio, cosine) of the model's x̂_0 difference against the data's, summed over `fill`."""
    import torch

    model, data = 0.0, 0.0
    for i, words in enumerate(fill):
        a, b = (template.format(words) for template in pair)
        model = model + first_step_x0(pipe, a, noise, guidance) - first_step_x0(pipe, b, noise, guidance)
        data = data + data_latents(pipe, a, scenes, seed=i) - data_latents(pipe, b, scenes, seed=100 + i)
    cosine = torch.nn.functional.cosine_similarity(model.flatten(), data.flatten(), dim=0).item()
    return (model.norm() / data.norm()).item(), cosine


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["toy-sd", "toy-sd3"], help="catalog names or folders")
    parser.add_argument("--noises", type=int, default=32, help="noise draws a caption (the same for both)")
    parser.add_argument("--scenes", type=int, default=64, help="rendered scenes a caption for the data side")
    parser.add_argument(
        "--oracle-steps",
        type=int,
        nargs="*",
        default=[0, 3, 6, 10],
        help="K values of the oracle (UNet models)",
    )
    parser.add_argument("--samples", type=int, default=4, help="oracle: seeds a position prompt")
    args = parser.parse_args()

    import torch

    from studio.models import ModelManager
    from studio.toyworld.geneval import prompt_set

    torch.manual_seed(0)
    manager = ModelManager()
    for name in args.models:
        spec = manager.resolve(name)
        if not Path(spec.source).exists():
            print(f"{name}: not trained yet, skipped")
            continue
        guidance = spec.defaults.get("guidance", 4.0)
        with manager.lend(name) as pipe:
            channels = (getattr(pipe, "unet", None) or pipe.transformer).config.in_channels
            noise = torch.randn(args.noises, channels, 8, 8, generator=torch.Generator().manual_seed(0))
            rows = {
                key: compare(pipe, pair, OBJECTS, noise, guidance, args.scenes) for key, pair in PAIRS.items()
            }
            rows["colour red / blue"] = compare(
                pipe, COLOUR_PAIR, COLOUR_SHAPES, noise, guidance, args.scenes
            )
            for key, (ratio, cosine) in rows.items():
                print(
                    f"{name} (guidance {guidance:g}) {key:18s} ratio {ratio:.3f}  cosine {cosine:+.2f}",
                    flush=True,
                )
            if not hasattr(pipe, "unet") or not args.oracle_steps:
                continue
            prompts = [p for category, p in prompt_set(16) if category == "position"]
            print(
                f"{name} oracle: chance (position word ignored), position {chance_position_score(prompts):.3f}"
            )
            priors = guided_priors(pipe, prompts, args.scenes, guidance)
            for k in args.oracle_steps:
                score = oracle_position_score(pipe, prompts, range(args.samples), k, guidance, priors)
                print(
                    f"{name} oracle: data prior for the first {k:2d} of 25 steps, position {score:.3f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
