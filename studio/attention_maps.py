"""Per-token cross-attention heat maps drawn over the image they shaped.

Each word token's map (softmax(QKᵀ/√d) over the tokens, averaged over heads, layers and
steps) is normalised to its own peak, as in Hertz et al.'s notebooks, coloured with an
inferno-like ramp and laid over the image, one labelled tile per token.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Inferno's ramp at five stops: black → purple → red → orange → pale yellow.
RAMP = np.array([(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)], dtype=np.float32)
OVERLAY = 0.6  # share of the heat colour in each tile
LABEL_HEIGHT = 16


def colorize(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (h, w) → RGB uint8 (h, w, 3) along the ramp."""
    position = np.clip(values, 0.0, 1.0) * (len(RAMP) - 1)
    low = np.floor(position).astype(int).clip(0, len(RAMP) - 2)
    frac = (position - low)[..., None]
    return (RAMP[low] * (1 - frac) + RAMP[low + 1] * frac).astype(np.uint8)


def token_label(token: str) -> str:
    return token.replace("</w>", "")


def token_heatmaps(image: Image.Image, maps, tokens: list[str], map_shape: tuple[int, int]) -> Image.Image:
    """One row of tiles, one per word token (BOS and EOS left out), each the image with the
    token's map over it and the token written beneath.

    maps: (h·w, T) tensor of one prompt's mean cross-attention; tokens: that prompt's tokens
    with BOS and EOS, as the tokenizer spells them."""
    h, w = map_shape
    words = list(range(1, len(tokens) - 1))
    side = 128 if max(image.size) < 256 else 192
    tile_w = side
    tile_h = round(side * image.height / image.width)
    base = image.convert("RGB").resize((tile_w, tile_h), Image.Resampling.LANCZOS)
    sheet = Image.new("RGB", (tile_w * max(1, len(words)), tile_h + LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    grid = maps.float().cpu().numpy().reshape(h, w, -1)
    for column, index in enumerate(words):
        values = grid[..., index]
        values = values / max(float(values.max()), 1e-8)
        heat = Image.fromarray(colorize(values)).resize((tile_w, tile_h), Image.Resampling.BICUBIC)
        tile = Image.blend(base, heat, OVERLAY)
        sheet.paste(tile, (column * tile_w, 0))
        label = token_label(tokens[index])
        text_w = draw.textlength(label, font=font)
        draw.text((column * tile_w + (tile_w - text_w) / 2, tile_h + 2), label, fill="black", font=font)
    return sheet
