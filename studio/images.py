"""Input images for the editing techniques: read safely, orient, and fit to a multiple of 8.

An input image is hostile until read: its file size and pixel count are checked before
its pixels are decoded (decompression bombs), it is turned upright by its EXIF
orientation, flattened to RGB over white, and fitted to the latent grid (sides a
multiple of 8) by the user's choice of `crop` (centre crop, nothing rescaled) or
`resize` (rescaled to the nearest multiples of 8). The fit is reported, so the UI and
the CLI can say what was done to the picture.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from .settings import SettingsError

MAX_FILE_BYTES = 32 * 1024 * 1024
MAX_PIXELS = 4096 * 4096
MAX_SIDE = 2048  # after fitting: larger inputs are refused, not silently shrunk
MIN_SIDE = 8
FIT_MODES = ("crop", "resize")


class ImageInputError(SettingsError):
    """An input image that can't be used; the message says why."""


@dataclass(frozen=True)
class FittedImage:
    image: Image.Image
    original_size: tuple[int, int]
    note: str  # what fitting did, e.g. "cropped 100×90 to 96×88"


def open_image(source) -> Image.Image:
    """An RGB, upright PIL image from a path, bytes, a file object or a PIL image."""
    if source is None:
        raise ImageInputError("no input image given")
    if isinstance(source, Image.Image):
        image = source
        _check_pixels(*image.size)
    else:
        data = _read_bytes(source)
        try:
            image = Image.open(io.BytesIO(data))
            _check_pixels(*image.size)
            image.load()
        except Image.DecompressionBombError:
            raise ImageInputError(f"the image is too large; the limit is {MAX_PIXELS:,} pixels") from None
        except UnidentifiedImageError:
            raise ImageInputError(
                "the input is not a readable image (an unknown or damaged format)"
            ) from None
        except (OSError, SyntaxError) as exc:
            raise ImageInputError(f"the input is not a readable image ({_first_line(exc)})") from None
    try:
        image = ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError):
        pass  # a broken EXIF block: keep the stored orientation
    return _flatten(image)


def fit_to_grid(image: Image.Image, mode: str = "crop", multiple: int = 8) -> FittedImage:
    """Make both sides a multiple of `multiple` by centre-cropping or resizing."""
    if mode not in FIT_MODES:
        raise ImageInputError(f"fit must be one of {', '.join(FIT_MODES)}, not {mode!r}")
    w, h = image.size
    if mode == "crop":
        nw, nh = w // multiple * multiple, h // multiple * multiple
    else:
        nw, nh = (max(multiple, round(v / multiple) * multiple) for v in (w, h))
    if nw < MIN_SIDE or nh < MIN_SIDE:
        raise ImageInputError(f"the image is too small ({w}×{h}); each side needs at least {MIN_SIDE} px")
    if max(nw, nh) > MAX_SIDE:
        raise ImageInputError(
            f"the image is too large ({w}×{h}); sides up to {MAX_SIDE} px are accepted — scale it down first"
        )
    if (nw, nh) == (w, h):
        return FittedImage(image, (w, h), f"kept at {w}×{h}")
    if mode == "crop":
        left, top = (w - nw) // 2, (h - nh) // 2
        fitted = image.crop((left, top, left + nw, top + nh))
        return FittedImage(fitted, (w, h), f"cropped {w}×{h} to {nw}×{nh} (centre)")
    fitted = image.resize((nw, nh), Image.Resampling.LANCZOS)
    return FittedImage(fitted, (w, h), f"resized {w}×{h} to {nw}×{nh}")


def _read_bytes(source) -> bytes:
    if isinstance(source, bytes | bytearray):
        data = bytes(source)
    elif isinstance(source, str | os.PathLike):
        try:
            with open(source, "rb") as fh:
                data = fh.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise ImageInputError(f"can't read the input image: {exc.strerror or exc}") from None
    elif hasattr(source, "read"):
        data = source.read(MAX_FILE_BYTES + 1)
    else:
        raise ImageInputError(f"unsupported image input of type {type(source).__name__}")
    if not data:
        raise ImageInputError("the input image is empty")
    if len(data) > MAX_FILE_BYTES:
        raise ImageInputError(f"the image file is larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB")
    return data


def _check_pixels(w: int, h: int) -> None:
    if w * h > MAX_PIXELS:
        raise ImageInputError(f"the image is too large ({w}×{h}); the limit is {MAX_PIXELS:,} pixels")


def _flatten(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
