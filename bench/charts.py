"""Small line charts for the benchmarks, drawn with PIL alone (no plotting library here)."""

from __future__ import annotations

from pathlib import Path

COLORS = [(40, 90, 220), (220, 40, 40), (40, 170, 70), (140, 60, 190)]


def line_chart(
    series: dict[str, list[tuple[float, float]]], x_label: str, path: Path, y_label: str = ""
) -> None:
    """One line per named series of (x, y) points; axes span the data, ticks at 5 steps."""
    from PIL import Image, ImageDraw

    xs = [x for points in series.values() for x, _ in points]
    ys = [y for points in series.values() for _, y in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(0.0, min(ys)), max(ys) * 1.05 or 1.0
    w, h, pad = 480, 300, 48
    image = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(image)
    d.rectangle((pad, pad // 2, w - pad // 2, h - pad), outline="black")

    def at(x: float, y: float) -> tuple[float, float]:
        return (
            pad + (w - 1.5 * pad) * (x - x0) / ((x1 - x0) or 1),
            h - pad - (h - 1.5 * pad) * (y - y0) / ((y1 - y0) or 1),
        )

    for i in range(6):
        x, y = x0 + (x1 - x0) * i / 5, y0 + (y1 - y0) * i / 5
        d.text((at(x, y0)[0] - 8, h - pad + 4), f"{x:.3g}", fill="black")
        d.text((4, at(x0, y)[1] - 6), f"{y:.3g}", fill="black")
    for (name, points), color in zip(series.items(), COLORS, strict=False):
        pixels = [at(x, y) for x, y in points]
        d.line(pixels, fill=color, width=2)
        for px, py in pixels:
            d.ellipse((px - 2, py - 2, px + 2, py + 2), fill=color)
        d.text((pixels[-1][0] - 8 * len(name), pixels[-1][1] - 14), name, fill=color)
    d.text((w // 2 - 4 * len(x_label), h - 16), x_label, fill="black")
    if y_label:
        d.text((pad + 4, 4), y_label, fill="black")
    image.save(path)
