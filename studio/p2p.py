"""Prompt-to-Prompt: edit a generated image by editing its prompt, through cross-attention.

Hertz et al., "Prompt-to-Prompt Image Editing with Cross Attention Control" (ICLR 2023).
The source prompt P and the edited prompt P* are sampled in ONE batched run from the same
noise x_T. In every cross-attention layer the edited branch's maps M*_t (softmax(QKᵀ/√d),
§3.1 eq. 1) are overridden by the source's M_t for t > τ (Algorithm 1, `Edit(M_t, M*_t, t)`):

- word swap (§3.2, "replace"): M*_t ← M_t for t ≥ τ_c, tokens mapped word for word
  (a word of k tokens spreads its map 1/k over a word of other length);
- adding a phrase ("refine"): (M_t)_{i,A(j)} for the tokens j the prompts share, through the
  alignment A, and (M*_t)_{i,j} for the added tokens;
- attention re-weighting ("reweight"): (M*_t)_{i,j} ← c · (M_t)_{i,j} for the chosen word's
  tokens j, amplifying or attenuating its effect.

  CLIP's text tower is causal, so a word also lives in the state of every token after it
  ("circle" in "a red circle" is read as a red circle's). Scaling the word's own map leaves
  that share as it was, and a denoiser that reads the word there does not move: on toy-sd,
  c from 0 to 8 on "red"'s own map never raised red's pixel share (0.099 → 0.026). So the
  later states of P* are scaled too: E*_k ← E_k + (c − 1)(E_k − E'_k) for the tokens k after
  the word, where E' encodes P* without the word, aligned token for token, each state then
  rescaled to ‖E_k‖ (an unscaled extrapolation left the picture at c ≥ 4). At c = 1 nothing
  changes, at c = 0 the word is gone from P* in both places, and c > 1 extrapolates its
  effect through those states alone: the own map takes min(c, 1). On toy-sd, c > 1 on the
  own map shrank the word's object (red share of "a red circle" 0.091 at c = 1, 0.077 at
  c = 8, 24 seeds); with the own map held at 1 it is 0.090 at c = 2 and 0.100 at c = 8, the
  extra red coming as new red shapes (1.7 shapes an image at c = 4).

Self-attention maps of the edited branch are replaced by the source's in the first
`self_replace` share of the steps too (the released code does it; the paper's §3.2 notes it
keeps geometry), in layers of at most 16 × 16 positions. Local blending (§3.3) keeps the
edited latents only where the blend words attend: after each step, the words' maps from
both prompts (this step, the chosen layers) are thresholded into a mask α and
z*_t ← (1 − α) ⊙ z_t + α ⊙ z*_t.

Only the conditional half of classifier-free guidance is edited, as in the released code.
Works on the SD 1.x / 2.x family (UNet cross-attention on one CLIP text encoder),
including toy-sd. The processors are lent by the model manager and taken back when the
run ends, so the next txt2img run on the same cached pipeline is untouched.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from .attention_maps import token_heatmaps
from .models import ModelManager, family_of_pipe
from .progress import StepInfo
from .result import Result
from .schedulers import check_scheduler, make_scheduler
from .settings import Settings, SettingsError, check_float, check_int, check_prompt, check_size
from .txt2img import MAX_SEED, WEIGHTING_SYNTAX, model_defaults, sampling_defaults

MODES = ("replace", "refine", "reweight")
SUPPORTED_FAMILIES = ("sd",)
SELF_REPLACE_MAX_POSITIONS = 16 * 16  # self-attention is only shared in layers this small
BLEND_START = 0.2  # local blending begins after this share of the steps
MAX_WORDS = 8
# Hertz et al.'s word-swap fractions on SD; a catalog entry may set its own (toy-sd keeps its
# layout only when self-attention is shared for longer: see its catalog entry).
PAPER_REPLACE = {"cross_replace": 0.8, "self_replace": 0.4}


@dataclass(frozen=True)
class Reweight:
    word: str
    factor: float


@dataclass(frozen=True)
class PromptToPromptSettings(Settings):
    technique = "p2p"
    schema_version = 1

    prompt: str = ""  # the source prompt P
    edit_prompt: str = ""  # P*; empty in reweight mode (P* = P)
    mode: str = "replace"
    model: str = "toy-sd"
    negative_prompt: str = ""
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    scheduler: str | None = None
    width: int | None = None
    height: int | None = None
    cross_replace: float | None = None  # share of the steps whose cross-attention comes from P (τ_c)
    self_replace: float | None = None  # share of the steps whose self-attention comes from P
    local_blend: tuple[str, ...] = ()  # words whose attention region may change
    blend_threshold: float = 0.3
    reweight: tuple[Reweight, ...] = ()
    map_size: int | None = None  # latent width of the attention layers shown and blended

    def __post_init__(self):
        check_prompt("prompt", self.prompt, required=True)
        check_prompt("edit prompt", self.edit_prompt, required=False)
        check_prompt("negative prompt", self.negative_prompt, required=False)
        if self.mode not in MODES:
            raise SettingsError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        check_int("seed", self.seed, 0, MAX_SEED)
        check_int("steps", self.steps, 1, 150)
        check_float("guidance", self.guidance, 0.0, 30.0)
        check_size("width", self.width)
        check_size("height", self.height)
        check_float("cross-attention replace fraction", self.cross_replace, 0.0, 1.0)
        check_float("self-attention replace fraction", self.self_replace, 0.0, 1.0)
        check_float("local blend threshold", self.blend_threshold, 0.0, 1.0)
        check_int("attention map size", self.map_size, 1, 512)
        if not isinstance(self.model, str) or not self.model.strip():
            raise SettingsError("no model given")
        for text in (self.prompt, self.edit_prompt):
            if WEIGHTING_SYNTAX.search(text):
                raise SettingsError(
                    "Prompt-to-Prompt aligns plain words; drop the (word:1.3) weighting syntax "
                    "and use reweight instead"
                )
        self._check_prompt_pair()
        self._check_words()

    def _check_prompt_pair(self) -> None:
        source, edited = words(self.prompt), words(self.edited_prompt)
        if self.mode == "reweight":
            if self.edit_prompt.strip() and source != edited:
                raise SettingsError(
                    "reweight keeps the prompt: leave the edit prompt empty, or use replace or "
                    "refine together with reweight words"
                )
            if not self.reweight:
                raise SettingsError("reweight needs at least one WORD:FACTOR")
            return
        if not self.edit_prompt.strip():
            raise SettingsError(f"{self.mode} needs an edit prompt")
        if source == edited:
            raise SettingsError(
                "the edit prompt is the prompt: swap a word (replace), add words (refine), or use reweight"
            )
        if self.mode == "replace" and len(source) != len(edited):
            raise SettingsError(
                f"replace swaps words one for one, but the prompt has {len(source)} words and the "
                f"edit prompt {len(edited)}: use refine to add words"
            )
        if self.mode == "refine" and subsequence(source, edited) is None:
            raise SettingsError(
                "refine adds words to the prompt, but the edit prompt does not keep all of the "
                "prompt's words in order: use replace to swap words"
            )

    def _check_words(self) -> None:
        if len(self.local_blend) > MAX_WORDS or len(self.reweight) > MAX_WORDS:
            raise SettingsError(f"at most {MAX_WORDS} local blend and {MAX_WORDS} reweight words")
        both = set(words(self.prompt)) | set(words(self.edited_prompt))
        for word in self.local_blend:
            if not isinstance(word, str) or normal(word) not in both:
                raise SettingsError(f"local blend word {word!r} is in neither prompt")
        for entry in self.reweight:
            if not isinstance(entry, Reweight):
                raise SettingsError("reweight must be a list of {word, factor}")
            check_float(f"reweight factor of {entry.word!r}", entry.factor, -10.0, 10.0)
            if normal(entry.word) not in words(self.edited_prompt):
                raise SettingsError(f"reweight word {entry.word!r} is not in the edit prompt")

    @property
    def edited_prompt(self) -> str:
        """P*: the edit prompt, or the prompt itself when only reweighting."""
        return self.edit_prompt if self.edit_prompt.strip() else self.prompt


def normal(word: str) -> str:
    return re.sub(r"[^\w']", "", word.lower())


def words(text: str) -> list[str]:
    return [normal(w) for w in text.split() if normal(w)]


def subsequence(short: list, long: list) -> list[int] | None:
    """Positions in `long` of `short`'s items in order (leftmost match), or None."""
    positions, j = [], 0
    for item in short:
        while j < len(long) and long[j] != item:
            j += 1
        if j == len(long):
            return None
        positions.append(j)
        j += 1
    return positions


# --------------------------------------------------------------------------- token alignment


def word_tokens(tokenizer, text: str) -> list[list[int]]:
    """Token positions (BOS at 0) of each whitespace word of `text` that has a normal form."""
    positions, at = [], 1
    ids = []
    for word in text.split():
        piece = tokenizer.encode(word, add_special_tokens=False)
        ids += piece
        if normal(word):
            positions.append(list(range(at, at + len(piece))))
        at += len(piece)
    if ids != tokenizer.encode(text, add_special_tokens=False):
        raise SettingsError(f"could not align the words of {text!r} with the tokenizer's tokens")
    if at + 1 > tokenizer.model_max_length:
        raise SettingsError(
            f"{text!r} is {at + 1} tokens long; this model reads {tokenizer.model_max_length}, "
            "and Prompt-to-Prompt needs every word: shorten it"
        )
    return positions


def token_length(tokenizer, text: str) -> int:
    """Tokens of `text` with BOS and EOS."""
    return len(tokenizer.encode(text, add_special_tokens=False)) + 2


def alignment(tokenizer, s: PromptToPromptSettings):
    """The source → edited token map for cross-attention: `mapper` (T × T, source rows, edited
    columns) and `alphas` (T,): 1 where an edited token takes the source's map, 0 where it keeps
    its own (refine's added words)."""
    import torch

    n = tokenizer.model_max_length
    src_words, edit_words = word_tokens(tokenizer, s.prompt), word_tokens(tokenizer, s.edited_prompt)
    pairs: list[tuple[list[int], list[int]]] = [([0], [0])]  # BOS
    if s.mode == "refine":
        kept = subsequence(words(s.prompt), words(s.edited_prompt))
        pairs += [(src_words[i], edit_words[j]) for i, j in enumerate(kept)]
    else:  # replace, reweight: word i ↔ word i
        pairs += list(zip(src_words, edit_words, strict=True))
    # EOS and padding: the k-th token after each prompt's last word ↔ each other.
    src_end, edit_end = token_length(tokenizer, s.prompt) - 1, token_length(tokenizer, s.edited_prompt) - 1
    for k in range(n - max(src_end, edit_end)):
        pairs.append(([src_end + k], [edit_end + k]))
    mapper = torch.zeros(n, n)
    alphas = torch.zeros(n)
    for src, edit in pairs:
        if len(src) == len(edit):
            for a, b in zip(src, edit, strict=True):
                mapper[a, b] = 1.0
        else:  # a word of other token length: each edited token takes the word's mean map
            for b in edit:
                mapper[src, b] = 1.0 / len(src)
        alphas[edit] = 1.0
    # Padding of a shorter P* that no source token reaches takes the source's last token.
    for b in range(edit_end + 1, n):
        if alphas[b] == 0:
            mapper[n - 1, b], alphas[b] = 1.0, 1.0
    return mapper, alphas


def equalizer(tokenizer, s: PromptToPromptSettings):
    """c per edited token's own map: min(c, 1) on the reweighted words' tokens, 1 elsewhere
    (c > 1 acts through the later token states alone: `reweighted_states`)."""
    import torch

    scale = torch.ones(tokenizer.model_max_length)
    edit_words = word_tokens(tokenizer, s.edited_prompt)
    names = words(s.edited_prompt)
    for entry in s.reweight:
        for name, positions in zip(names, edit_words, strict=True):
            if name == normal(entry.word):
                scale[positions] = min(entry.factor, 1.0)
    return scale


def reweighted_states(encode, tokenizer, s: PromptToPromptSettings, states):
    """P*'s token states (1, T, dim) with each reweighted word's share in the later states
    scaled by its factor: E + (c − 1)(E − E'), E' = `encode`(P* without the word) aligned to P*,
    each token's state then rescaled to its norm in E."""
    n = tokenizer.model_max_length
    edit_words = word_tokens(tokenizer, s.edited_prompt)
    names = words(s.edited_prompt)
    out = states.clone()
    for entry in s.reweight:
        target = normal(entry.word)
        own = {p for name, ps in zip(names, edit_words, strict=True) if name == target for p in ps}
        reduced = encode(" ".join(w for w in s.edited_prompt.split() if normal(w) != target))
        aligned, j = states.clone(), 0
        for k in range(n):
            if k not in own:
                aligned[:, k] = reduced[:, min(j, n - 1)]
                j += 1
        out = out + (entry.factor - 1.0) * (states - aligned)
    return out * (states.norm(dim=-1, keepdim=True) / out.norm(dim=-1, keepdim=True).clamp_min(1e-6))


def blend_tokens(tokenizer, s: PromptToPromptSettings):
    """(2, T) indicator of the local-blend words' tokens in P and in P*."""
    import torch

    mask = torch.zeros(2, tokenizer.model_max_length)
    for row, text in enumerate((s.prompt, s.edited_prompt)):
        for name, positions in zip(words(text), word_tokens(tokenizer, text), strict=True):
            if name in {normal(w) for w in s.local_blend}:
                mask[row, positions] = 1.0
    return mask


# --------------------------------------------------------------------------- the controller


class AttentionController:
    """Edits the conditional branch's attention probabilities (Algorithm 1's `Edit`) and keeps
    the per-token cross-attention maps: summed over steps for display, per step for blending."""

    def __init__(self, *, steps, mapper, alphas, scale, cross_replace, self_replace, map_shape, latent_shape):
        self.cur_step = 0
        self.cross_until = int(steps * cross_replace)
        self.self_until = int(steps * self_replace)
        self.mapper, self.alphas, self.scale = mapper, alphas, scale
        self.map_shape = map_shape  # (h, w) of the layers whose maps are kept
        self.latent_shape = latent_shape
        self.total = None  # (2, h·w, T) summed over layers and steps
        self.total_count = 0
        self.step_maps = None  # the same, this step only
        self.step_count = 0

    def __call__(self, probs, is_cross: bool, heads: int):
        """probs: (batch · heads, queries, keys) with batch = [uncond P, uncond P*,] P, P*."""
        batch = probs.shape[0] // heads
        probs = probs.view(batch, heads, *probs.shape[1:])
        source, edited = probs[batch - 2], probs[batch - 1]
        if is_cross:
            if self.cur_step < self.cross_until:
                mapped = source @ self.mapper.to(source)  # (heads, queries, edited tokens)
                alphas = self.alphas.to(source)
                probs[batch - 1] = (alphas * mapped + (1 - alphas) * edited) * self.scale.to(source)
            if probs.shape[2] == self.map_shape[0] * self.map_shape[1]:
                self._keep(probs[batch - 2 :].mean(dim=1))
        elif self.cur_step < self.self_until and probs.shape[2] <= SELF_REPLACE_MAX_POSITIONS:
            probs[batch - 1] = source
        return probs.reshape(batch * heads, *probs.shape[2:])

    def _keep(self, maps) -> None:
        maps = maps.detach().float()
        self.step_maps = maps if self.step_maps is None else self.step_maps + maps
        self.step_count += 1

    def end_step(self) -> None:
        if self.step_maps is not None:
            self.total = self.step_maps if self.total is None else self.total + self.step_maps
            self.total_count += self.step_count
        self.step_maps, self.step_count = None, 0
        self.cur_step += 1

    def blend_mask(self, tokens, threshold: float):
        """Local blending's α (1, 1, h, w) at latent size from this step's maps (§3.3)."""
        import torch.nn.functional as F

        h, w = self.map_shape
        maps = (self.step_maps / self.step_count * tokens[:, None, :].to(self.step_maps)).sum(-1)
        maps = maps.view(2, 1, h, w)
        maps = F.max_pool2d(maps, 3, 1, padding=1)  # grow the region by one cell
        maps = F.interpolate(maps, size=self.latent_shape)
        # Scaled to [0, 1] between the map's floor and peak. The paper's code divides by the
        # peak alone, which assumes a floor near 0 (SD's 77-token maps); a small model's maps
        # sit on a floor of about a third of the peak, which would pass everywhere.
        low = maps.amin(dim=(2, 3), keepdim=True)
        high = maps.amax(dim=(2, 3), keepdim=True)
        mask = ((maps - low) / (high - low).clamp_min(1e-8)).gt(threshold)
        return (mask[:1] | mask[1:]).float()

    def mean_maps(self):
        """(2, h·w, T): per-token maps of P and P*, averaged over the kept layers and all steps."""
        return self.total / max(1, self.total_count)


class ControlledAttnProcessor:
    """diffusers' classic `AttnProcessor` (explicit softmax, so the maps exist) with the
    controller between the softmax and the product with V. One instance serves every layer."""

    def __init__(self, controller: AttentionController):
        self.controller = controller

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        import torch

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        batch_size, sequence_length, _ = (encoder_hidden_states if is_cross else hidden_states).shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if not is_cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        query = attn.head_to_batch_dim(query)

        probs = attn.get_attention_scores(query, key, attention_mask)
        probs = self.controller(probs, is_cross, attn.heads)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))

        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


# --------------------------------------------------------------------------- the run


def cross_attention_shapes(unet, latent_h: int, latent_w: int) -> list[tuple[int, int]]:
    """(h, w) of every UNet level that has cross-attention, finest first."""
    shapes, h, w = [], latent_h, latent_w
    types = unet.config.down_block_types
    for i, kind in enumerate(types):
        if "CrossAttn" in kind:
            shapes.append((h, w))
        if i < len(types) - 1:
            h, w = (h + 1) // 2, (w + 1) // 2
    if "CrossAttn" in (unet.config.mid_block_type or "") and (h, w) not in shapes:
        shapes.append((h, w))
    return shapes


def pick_map_shape(shapes: list[tuple[int, int]], width: int | None) -> tuple[int, int]:
    """The layers asked for by latent width, else the finest of at most 16 × 16 (SD at 512 px:
    16 × 16, as the paper shows them), else the coarsest."""
    if width is not None:
        for shape in shapes:
            if shape[1] == width:
                return shape
        sizes = ", ".join(str(w) for _, w in shapes)
        raise SettingsError(f"this model has cross-attention maps {sizes} wide, not {width}")
    small = [shape for shape in shapes if shape[0] * shape[1] <= 256]
    return small[0] if small else shapes[-1]


def p2p_defaults(spec) -> dict:
    """A model's sampling defaults and its cross- and self-attention replace fractions (its
    catalog entry's, else the paper's)."""
    fractions = {name: spec.defaults.get(name, value) for name, value in PAPER_REPLACE.items()}
    return {**model_defaults(spec), **fractions}


def resolve(settings: PromptToPromptSettings, models: ModelManager):
    spec = models.resolve(settings.model)
    if spec.family not in SUPPORTED_FAMILIES + ("unknown",):
        raise SettingsError(
            f"{spec.name} is a {spec.family} model; Prompt-to-Prompt here controls the UNet "
            "cross-attention of SD 1.x / 2.x models (toy-sd among them)"
        )
    d = p2p_defaults(spec)
    fractions = {name: d[name] for name in PAPER_REPLACE if getattr(settings, name) is None}
    s = settings.replace(
        **sampling_defaults(settings, d),
        **fractions,
        width=settings.width or d["width"],
        height=settings.height or d["height"],
    )
    check_scheduler(s.scheduler, "sd")
    return s


def run(
    settings: PromptToPromptSettings,
    models: ModelManager,
    *,
    on_step: Callable[[StepInfo], None] | None = None,
) -> Result:
    """Source and edited image from one batched run; `result.figures` holds the attention maps."""
    import torch

    # 1. Fill unset settings from the model's defaults; refuse families without UNet cross-attention.
    s = resolve(settings, models)
    started = time.perf_counter()
    # 2. Borrow the pipeline with our processor on every attention layer; lend() restores them.
    processor = ControlledAttnProcessor(None)
    with models.lend(s.model, "txt2img", attn_processors=processor) as pipe:
        family = family_of_pipe(pipe)
        if family not in SUPPORTED_FAMILIES:
            raise SettingsError(f"{s.model} is a {family} model; Prompt-to-Prompt here is for SD 1.x / 2.x")
        native = pipe.unet.config.sample_size * pipe.vae_scale_factor
        s = s.replace(width=s.width or native, height=s.height or native)
        pipe.scheduler = make_scheduler(s.scheduler, family, pipe.scheduler.config)

        # 3. Align the prompts' tokens: which source map each edited token takes, and reweighting.
        mapper, alphas = alignment(pipe.tokenizer, s)
        scale = equalizer(pipe.tokenizer, s)
        latent_shape = (s.height // pipe.vae_scale_factor, s.width // pipe.vae_scale_factor)
        map_shape = pick_map_shape(cross_attention_shapes(pipe.unet, *latent_shape), s.map_size)
        s = s.replace(map_size=map_shape[1])
        controller = AttentionController(
            steps=s.steps,
            mapper=mapper,
            alphas=alphas,
            scale=scale,
            cross_replace=s.cross_replace,
            self_replace=s.self_replace,
            map_shape=map_shape,
            latent_shape=latent_shape,
        )
        processor.controller = controller
        blend = blend_tokens(pipe.tokenizer, s) if s.local_blend else None

        # 4. After each step: local blending of the latents, then progress and cancel.
        def callback(_pipe, i, _t, kw):
            if blend is not None and i + 1 > s.steps * BLEND_START:
                latents = kw["latents"]
                mask = controller.blend_mask(blend, s.blend_threshold).to(latents)
                kw["latents"] = torch.cat([latents[:1], latents[:1] + mask * (latents[1:] - latents[:1])])
            controller.end_step()
            if on_step is not None:
                on_step(StepInfo(i + 1, s.steps, 0, 1, kw.get("latents")))
            return kw

        # 5. Reweighted words: their share in P*'s later token states scaled as well.
        prompts = {"prompt": [s.prompt, s.edited_prompt]}
        if s.reweight:

            def encode(text):
                return pipe.encode_prompt(text, pipe._execution_device, 1, False)[0]

            source = encode(s.prompt)
            edited = source if s.edited_prompt == s.prompt else encode(s.edited_prompt)
            edited = reweighted_states(encode, pipe.tokenizer, s, edited)
            prompts = {"prompt_embeds": torch.cat([source, edited])}

        # 6. One batched run of [P, P*] from the same noise (two generators, one seed).
        output = pipe(
            **prompts,
            negative_prompt=[s.negative_prompt] * 2 if s.negative_prompt else None,
            num_inference_steps=s.steps,
            guidance_scale=s.guidance,
            width=s.width,
            height=s.height,
            generator=[torch.Generator("cpu").manual_seed(s.seed) for _ in range(2)],
            callback_on_step_end=callback,
        )
        tokens = [
            pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer.encode(text))
            for text in (s.prompt, s.edited_prompt)
        ]
    # 7. Per-token heat maps over each image: what every word attended to.
    maps = controller.mean_maps()
    source, edited = output.images
    result = Result(settings=s, images=[source, edited], seeds=[s.seed, s.seed], family=family)
    result.figures = {
        "source attention": token_heatmaps(source, maps[0], tokens[0], map_shape),
        "edited attention": token_heatmaps(edited, maps[1], tokens[1], map_shape),
    }
    result.notes.append(f"attention maps: {map_shape[1]}×{map_shape[0]} layers, averaged over all steps")
    result.duration_s = time.perf_counter() - started
    return result
