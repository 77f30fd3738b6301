"""Textual Inversion (Gal et al. 2023, "An Image is Worth One Word").

One new word v* is added to the tokenizer and only its embedding is optimised (eq. 2:
v* = argmin_v E‖ε − ε_θ(z_t, t, c_θ(y))‖²); every other weight, and every other row of the
embedding table, stays frozen. Saved as `{token: embedding}` safetensors, which
`load_textual_inversion` reads, a few KB.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..settings import SettingsError
from .settings import TrainingSettings


def prepare(pipe, s: TrainingSettings) -> tuple[list, object]:
    """The embedding table trains; the returned hook puts back every row but the new word's
    after each optimiser step (weight decay and momentum would touch them all)."""
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    pieces = tokenizer.tokenize(s.token)
    if s.token in tokenizer.get_vocab() or (len(pieces) == 1 and pieces[0] != tokenizer.unk_token):
        raise SettingsError(f"{s.token} is already a word of this model's tokenizer: pick a new token")
    start = tokenizer(s.initializer, add_special_tokens=False).input_ids
    if len(start) != 1:
        raise SettingsError(f"the initializer {s.initializer!r} must be a single token of this model")
    tokenizer.add_tokens(s.token)
    token_id = tokenizer.convert_tokens_to_ids(s.token)
    encoder.resize_token_embeddings(len(tokenizer))
    table = encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[token_id] = table[start[0]]
    pipe.unet.requires_grad_(False)
    encoder.requires_grad_(False)
    table.requires_grad_(True)
    original = table.detach().clone()
    keep = torch.ones(table.shape[0], dtype=torch.bool)
    keep[token_id] = False

    def restore_other_rows() -> None:
        with torch.no_grad():
            table[keep] = original[keep]

    return [table], restore_other_rows


def save(pipe, s: TrainingSettings, folder: Path) -> Path:
    from safetensors.torch import save_file

    table = pipe.text_encoder.get_input_embeddings().weight
    token_id = pipe.tokenizer.convert_tokens_to_ids(s.token)
    path = folder / f"{s.output_name}.safetensors"
    save_file({s.token: table[token_id : token_id + 1].detach().float().cpu().contiguous()}, path)
    return path
