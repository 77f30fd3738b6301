"""Prompt-to-Prompt: token alignment, refusals, the run on toy-sd, the gallery and the CLI."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, TOY_SD

from studio.p2p import PromptToPromptSettings, Reweight, alignment, equalizer, reweighted_states, run
from studio.pngmeta import read_png
from studio.progress import Cancelled
from studio.registry import settings_from_dict
from studio.settings import SettingsError

needs_toy_sd = pytest.mark.skipif(not (TOY_SD / "model_index.json").exists(), reason="toy-sd not trained")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(ROOT / "assets" / "models" / "toy-clip")


def columns(mapper, alphas):
    """Edited token → {source token: weight} for the tokens that take the source's map."""
    return {
        b: {a: float(mapper[a, b]) for a in np.nonzero(mapper[:, b].numpy())[0]}
        for b in range(mapper.shape[1])
        if alphas[b] > 0
    }


# --------------------------------------------------------------------------- alignment


def test_word_swap_maps_every_token_to_its_own_position(tokenizer):
    s = PromptToPromptSettings(prompt="a red circle on the left", edit_prompt="a red square on the left")
    mapper, alphas = alignment(tokenizer, s)
    assert alphas.min() == 1  # every edited token takes the source's map
    assert np.array_equal(mapper.numpy(), np.eye(tokenizer.model_max_length))


def test_refine_maps_kept_words_and_leaves_added_words_their_own(tokenizer):
    s = PromptToPromptSettings(
        prompt="a circle on the left", edit_prompt="a large blue circle on the left", mode="refine"
    )
    mapper, alphas = alignment(tokenizer, s)
    # BOS a circle on the left EOS  →  BOS a large blue circle on the left EOS
    assert alphas[:7].tolist() == [1, 1, 0, 0, 1, 1, 1]
    cols = columns(mapper, alphas)
    assert cols[1] == {1: 1.0} and cols[4] == {2: 1.0} and cols[7] == {5: 1.0}  # a, circle, left
    assert cols[8] == {6: 1.0}  # EOS ↔ EOS, and the padding after it likewise
    assert all(sum(c.values()) == pytest.approx(1.0) for c in cols.values())


def test_a_word_of_other_token_length_spreads_its_map(tokenizer):
    # "zq" is not in the toy vocabulary: the tokenizer spells it with more than one token.
    n_tokens = len(tokenizer.encode("zq", add_special_tokens=False))
    assert n_tokens > 1
    s = PromptToPromptSettings(prompt="a red circle", edit_prompt="a red zq")
    mapper, alphas = alignment(tokenizer, s)
    cols = columns(mapper, alphas)
    for b in range(3, 3 + n_tokens):
        assert cols[b] == {3: 1.0}  # each of zq's tokens takes circle's map
    assert cols[3 + n_tokens] == {4: 1.0}  # EOS after the longer word ↔ the source's EOS
    assert alphas.min() == 1


def test_a_words_own_map_takes_its_factor_only_when_it_attenuates(tokenizer):
    s = PromptToPromptSettings(prompt="a red circle", mode="reweight", reweight=(Reweight("red", 3.0),))
    scale = equalizer(tokenizer, s)
    assert float(scale.sum()) == pytest.approx(tokenizer.model_max_length)  # c > 1: the later states only
    s = s.replace(reweight=(Reweight("red", 0.5),))
    scale = equalizer(tokenizer, s)
    assert scale[2] == 0.5 and float(scale.sum()) == pytest.approx(tokenizer.model_max_length - 0.5)


def test_reweight_scales_the_words_share_of_the_later_causal_states(tokenizer):
    """c = 1 changes nothing; c = 0 gives the tokens after the word the states of the prompt
    without it (aligned, at the prompt's norms); the tokens before it never change."""
    import torch
    from transformers import CLIPTextModel

    tower = CLIPTextModel.from_pretrained(ROOT / "assets" / "models" / "toy-clip").eval()

    def encode(text):
        ids = tokenizer(text, padding="max_length", truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return tower(ids).last_hidden_state

    prompt = "a red circle on the left"
    states = encode(prompt)

    def reweighted(factor):
        s = PromptToPromptSettings(prompt=prompt, mode="reweight", reweight=(Reweight("red", factor),))
        return reweighted_states(encode, tokenizer, s, states)

    assert torch.allclose(reweighted(1.0), states, atol=1e-6)
    gone, without = reweighted(0.0), encode("a circle on the left")
    assert torch.allclose(gone[:, :3], states[:, :3], atol=1e-6)  # BOS, "a", and "red" itself
    cosine = torch.nn.functional.cosine_similarity(gone[0, 3:], without[0, 2:-1], dim=-1)
    assert cosine.min() > 0.9999
    assert torch.allclose(gone.norm(dim=-1), states.norm(dim=-1), rtol=1e-5)
    assert not torch.allclose(reweighted(2.0)[:, 3:], states[:, 3:], atol=1e-3)


@needs_toy_sd
def test_reweighting_a_colour_word_raises_its_colour_share_monotonically(manager):
    """The pixel share of red rises with "red"'s factor up to 1 (the circle is then all red)
    and never falls after it: no step from one factor to the next lowers it by more than
    two standard errors of its seed-by-seed rise (or 4 pixels, where that error is smaller)."""
    from studio.toyworld.p2p_eval import is_non_decreasing, reweight_sweep

    sweep = reweight_sweep(
        manager,
        "toy-sd",
        "a red circle on a white background",
        "red",
        (0.0, 0.5, 1.0, 2.0, 4.0),
        seeds=range(4),
    )
    shares = {factor: row["share"] for factor, row in sweep.items()}
    assert shares[0.0] < 0.01 < shares[0.5] <= shares[1.0] + 0.01, sweep
    assert shares[1.0] > 0.05, sweep
    assert is_non_decreasing(sweep), sweep


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(edit_prompt="a red big square"), "replace swaps words one for one"),
        (dict(edit_prompt="a square", mode="refine"), "refine adds words"),
        (dict(edit_prompt="a red circle"), "the edit prompt is the prompt"),
        (dict(edit_prompt=""), "replace needs an edit prompt"),
        (dict(mode="reweight"), "reweight needs at least one"),
        (
            dict(mode="reweight", edit_prompt="a blue circle", reweight=(Reweight("red", 2),)),
            "reweight keeps the prompt",
        ),
        (dict(mode="reweight", reweight=(Reweight("blue", 2),)), "'blue' is not in the edit prompt"),
        (dict(edit_prompt="a red square", local_blend=("dog",)), "'dog' is in neither prompt"),
        (dict(edit_prompt="a red square", cross_replace=1.5), "between 0.0 and 1.0"),
        (dict(edit_prompt="a red square", self_replace=-0.1), "between 0.0 and 1.0"),
        (dict(edit_prompt="a (red:1.5) square"), "weighting syntax"),
        (dict(edit_prompt="a red square", mode="swap"), "mode must be one of"),
    ],
)
def test_bad_settings_are_refused_with_a_reason(kwargs, message):
    with pytest.raises(SettingsError, match=message.replace("(", r"\(")):
        PromptToPromptSettings(prompt="a red circle", **kwargs)


def test_settings_round_trip_through_the_registry():
    s = PromptToPromptSettings(
        prompt="a red circle on the left",
        edit_prompt="a red square on the left",
        local_blend=("circle", "square"),
        reweight=(Reweight("square", 2.0),),
        seed=3,
        map_size=8,
    )
    assert settings_from_dict(s.to_dict()) == s


def test_other_families_are_refused(manager, tiny_sd3):
    s = PromptToPromptSettings(
        prompt="a red circle", edit_prompt="a red square", model=str(tiny_sd3), steps=2
    )
    with pytest.raises(SettingsError, match="SD 1.x / 2.x"):
        run(s, manager)


def test_a_map_size_the_model_lacks_is_refused(manager, tiny_sd):
    s = PromptToPromptSettings(
        prompt="a red circle", edit_prompt="a red square", model=str(tiny_sd), steps=2, map_size=5
    )
    with pytest.raises(SettingsError, match="not 5"):
        run(s, manager)


# --------------------------------------------------------------------------- runs


def test_processors_are_restored_so_txt2img_is_untouched(manager, tiny_sd):
    from studio.models import ModelManager
    from studio.txt2img import Txt2ImgSettings
    from studio.txt2img import run as txt2img

    plain = Txt2ImgSettings(prompt="a red circle", model=str(tiny_sd), seed=5, steps=3)
    never_saw_p2p = np.asarray(txt2img(plain, ModelManager(device="cpu")).images[0])
    unet = manager.base(str(tiny_sd)).unet
    before = {name: type(p) for name, p in unet.attn_processors.items()}

    s = PromptToPromptSettings(
        prompt="a red circle", edit_prompt="a red square", model=str(tiny_sd), steps=3, seed=5
    )
    run(s, manager)
    with pytest.raises(Cancelled):  # a run stopped midway puts them back too

        def stop(_info):
            raise Cancelled("stop")

        run(s, manager, on_step=stop)
    assert {name: type(p) for name, p in unet.attn_processors.items()} == before
    assert np.array_equal(np.asarray(txt2img(plain, manager).images[0]), never_saw_p2p)


def test_one_batched_forward_a_step_for_both_prompts(manager, tiny_sd):
    from conftest import denoiser_batches

    s = PromptToPromptSettings(
        prompt="a red circle", edit_prompt="a red square", model=str(tiny_sd), steps=3, seed=1, guidance=5.0
    )
    with denoiser_batches(manager, tiny_sd) as batches:
        run(s, manager)
    assert batches == [4, 4, 4]  # [uncond P, uncond P*, P, P*] once a step


def test_without_any_replacement_the_edit_is_plain_generation(manager, tiny_sd):
    """cross 0 and self 0: nothing is carried over, so P* comes out as txt2img makes it."""
    from studio.txt2img import Txt2ImgSettings
    from studio.txt2img import run as txt2img

    s = PromptToPromptSettings(
        prompt="a red circle",
        edit_prompt="a red square",
        model=str(tiny_sd),
        steps=3,
        seed=9,
        cross_replace=0.0,
        self_replace=0.0,
    )
    edited = np.asarray(run(s, manager).images[1], dtype=float)
    plain = np.asarray(
        txt2img(Txt2ImgSettings(prompt="a red square", model=str(tiny_sd), seed=9, steps=3), manager).images[
            0
        ],
        dtype=float,
    )
    assert np.abs(edited - plain).max() <= 2  # explicit softmax vs SDPA: rounding only


@needs_toy_sd
def test_unset_replace_fractions_come_from_the_models_catalog_entry(manager):
    from studio.p2p import PAPER_REPLACE, resolve

    pair = dict(prompt="a red circle on the left", edit_prompt="a red square on the left")
    s = resolve(PromptToPromptSettings(**pair), manager)
    toy = manager.resolve("toy-sd").defaults["self_replace"]
    assert s.self_replace == toy != PAPER_REPLACE["self_replace"]  # toy-sd's own share
    assert s.cross_replace == PAPER_REPLACE["cross_replace"]  # not in its entry: the paper's
    assert resolve(PromptToPromptSettings(**pair, self_replace=0.3), manager).self_replace == 0.3


@needs_toy_sd
def test_word_swap_keeps_the_picture_and_beats_regeneration(manager):
    from studio.toyworld.p2p_eval import word_swap

    report = word_swap(manager, "toy-sd", n=10)
    assert report["p2p"] >= 0.7, report
    assert report["p2p"] > report["regenerate"], report
    blended = word_swap(manager, "toy-sd", n=10, local_blend=True, regenerate=False, blend_threshold=0.5)
    assert blended["p2p"] >= 0.7 and blended["p2p"] > report["regenerate"], (blended, report)


def test_swap_cases_blend_on_their_objects_words():
    """A shape swap blends on the old and the new shape word, a colour swap on the shape word;
    each word is in the prompt it belongs to, so the settings accept them."""
    from studio.p2p import words
    from studio.toyworld.p2p_eval import swap_cases

    for case in swap_cases(6):
        source, edited = words(case.prompt), words(case.edit_prompt)
        if case.attribute == "shape":
            old = next(a for a, b in zip(source, edited, strict=True) if a != b)
            assert case.blend_words == (old, case.new) and case.new in edited, case
        else:
            assert case.blend_words == (case.shape,) and case.shape in source and case.shape in edited, case
        PromptToPromptSettings(prompt=case.prompt, edit_prompt=case.edit_prompt, local_blend=case.blend_words)


@needs_toy_sd
def test_local_blend_confines_the_edit_to_the_words_region(manager):
    """A background swap blended on the shape's word: without the blend the background turns
    black; with it, only the circle's region may change, so the background stays white."""
    from studio.toyworld.judge import read

    backgrounds = {(): [], ("circle",): []}
    for seed in range(6):
        for blend in backgrounds:
            s = PromptToPromptSettings(
                prompt="a red circle on a white background",
                edit_prompt="a red circle on a black background",
                local_blend=blend,
                seed=seed,
            )
            backgrounds[blend].append(read(run(s, manager).images[1]).background)
    assert backgrounds[()].count("black") >= 4, backgrounds
    assert backgrounds[("circle",)].count("white") >= 4, backgrounds


@needs_toy_sd
def test_attention_maps_show_one_tile_per_word(manager):
    s = PromptToPromptSettings(
        prompt="a red circle on the left", edit_prompt="a red square on the left", seed=2
    )
    result = run(s, manager)
    source_sheet = result.figures["source attention"]
    assert source_sheet.width == 6 * 128  # a red circle on the left: six words, 128 px tiles
    assert "8×8 layers" in result.notes[0]


@needs_toy_sd
def test_studio_stores_the_source_and_its_edited_child(studio):
    s = PromptToPromptSettings(
        prompt="a red circle on the left", edit_prompt="a blue circle on the left", seed=4
    )
    result, (source, edited) = studio.p2p(s)
    assert edited.parent_id == source.id
    assert (source.prompt, edited.prompt) == (s.prompt, s.edit_prompt)
    assert source.technique == edited.technique == "p2p"
    assert settings_from_dict(edited.settings) == result.settings
    infotext = read_png(edited.image_path).infotext
    assert infotext.startswith(s.edit_prompt) and 'Prompt-to-Prompt: "replace from' in infotext


@needs_toy_sd
def test_cli_writes_both_images_and_the_maps(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "studio", "p2p", "--data-dir", str(tmp_path / "data")]
    done = subprocess.run(
        cmd
        + [
            "--prompt",
            "a red circle",
            "--edit-prompt",
            "a red square",
            "--seed",
            "1",
            "--steps",
            "6",
            "--local-blend",
            "circle",
            "square",
            "--out-dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "attention_edited.png",
        "attention_source.png",
        "edited.png",
        "source.png",
    ]
    assert "child of" in done.stdout

    bad = subprocess.run(
        cmd + ["--prompt", "a red circle", "--edit-prompt", "a big red square", "--out-dir", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: replace swaps words one for one")
    assert "Traceback" not in bad.stderr
