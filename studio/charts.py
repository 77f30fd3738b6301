"""Small charts drawn with PIL alone (no plotting library is installed): line charts, grouped
bars and image grids, for the evaluation tab and the benchmarks."""

from __future__ import annotations

from PIL import Image, ImageDraw

COLORS = [(40, 90, 220), (220, 40, 40), (40, 170, 70), (140, 60, 190), (240, 130, 30), (30, 160, 170)]
W, H, PAD = 480, 300, 48
LINE = 12  # pixels between two stacked text lines
# PIL's built-in font has no Greek or maths glyphs (they draw as boxes): spell them out.
_SPELLED = str.maketrans(
    {"λ": "lambda", "α": "alpha", "σ": "sigma", "ε": "eps", "≥": ">=", "≤": "<=", "→": "->"}
)


def _spelled(text: object) -> str:
    return str(text).translate(_SPELLED)


def _text(d: ImageDraw.ImageDraw, xy: tuple[float, float], text: object, fill) -> None:
    d.text(xy, _spelled(text), fill=fill)


def _frame(y_label: str) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(image)
    d.rectangle((PAD, PAD // 2, W - PAD // 2, H - PAD), outline="black")
    if y_label:
        _text(d, (PAD + 4, 4), y_label, "black")
    return image, d


def line_chart(series: dict[str, list[tuple[float, float]]], x_label: str, y_label: str = "") -> Image.Image:
    """One line per named series of (x, y) points; axes span the data, six ticks each."""
    xs = [x for points in series.values() for x, _ in points]
    ys = [y for points in series.values() for _, y in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(0.0, min(ys)), (max(ys) * 1.05) or 1.0
    image, d = _frame(y_label)

    def at(x: float, y: float) -> tuple[float, float]:
        return (
            PAD + (W - 1.5 * PAD) * (x - x0) / ((x1 - x0) or 1),
            H - PAD - (H - 1.5 * PAD) * (y - y0) / ((y1 - y0) or 1),
        )

    for i in range(6):
        x, y = x0 + (x1 - x0) * i / 5, y0 + (y1 - y0) * i / 5
        _text(d, (at(x, y0)[0] - 8, H - PAD + 4), f"{x:.3g}", "black")
        _text(d, (4, at(x0, y)[1] - 6), f"{y:.3g}", "black")
    ends = []
    for (name, points), color in zip(series.items(), COLORS * 4, strict=False):
        pixels = [at(x, y) for x, y in points]
        if len(pixels) > 1:
            d.line(pixels, fill=color, width=2)
        for px, py in pixels:
            d.ellipse((px - 2, py - 2, px + 2, py + 2), fill=color)
        ends.append((pixels[-1][1] - 14, pixels[-1][0], _spelled(name), color))
    below = float("-inf")  # each line's name at its end, pushed down past the one above
    for y, x, name, color in sorted(ends):
        below = max(y, below + LINE)
        _text(d, (x - 7 * len(name), below), name, color)
    x_label = _spelled(x_label)
    _text(d, (W // 2 - 4 * len(x_label), H - 16), x_label, "black")
    return image


def bar_chart(groups: dict[str, dict[str, float]], y_label: str = "") -> Image.Image:
    """Grouped bars in [0, 1]: one group per category, one bar per named series."""
    names = list(groups)
    categories = list(next(iter(groups.values())))
    image, d = _frame(y_label)
    span = (W - 1.5 * PAD) / len(categories)
    bar = span * 0.8 / len(names)
    for ci, category in enumerate(categories):
        left = PAD + ci * span + span * 0.1
        for ni, name in enumerate(names):
            value = max(0.0, min(1.0, groups[name][category]))
            top = H - PAD - (H - 1.5 * PAD) * value
            d.rectangle(
                (left + ni * bar, top, left + (ni + 1) * bar - 1, H - PAD), fill=COLORS[ni % len(COLORS)]
            )
        _text(d, (left, H - PAD + 4 + 10 * (ci % 2)), category[:14], "black")
    for ni, name in enumerate(names):  # the legend, in a row above the frame
        _text(d, (W // 2 + ni * 110, 4), name[:18], COLORS[ni % len(COLORS)])
    return image


def image_grid(
    cells, rows: tuple[str, ...], columns: tuple[str, ...], per_cell: int = 4, side: int = 64
) -> Image.Image:
    """Rows are models, columns axis values; each cell shows its first `per_cell` images."""
    label = 14
    sheet = Image.new("RGB", (label * 10 + len(columns) * per_cell * side, label + len(rows) * side), "white")
    d = ImageDraw.Draw(sheet)
    for ci, column in enumerate(columns):
        _text(d, (label * 10 + ci * per_cell * side + 4, 1), column, "black")
    for ri, row in enumerate(rows):
        _text(d, (2, label + ri * side + side // 2 - 6), str(row)[-22:], "black")
        for ci, column in enumerate(columns):
            cell = next(c for c in cells if c.model == row and c.value == column)
            for k, picture in enumerate(cell.images[:per_cell]):
                thumb = picture.convert("RGB").resize((side, side))
                sheet.paste(thumb, (label * 10 + (ci * per_cell + k) * side, label + ri * side))
    return sheet
