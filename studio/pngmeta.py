"""PNG generation metadata: AUTOMATIC1111-compatible infotext plus our own settings JSON.

Every PNG Latent Studio writes carries two text chunks:

* ``parameters`` -- the AUTOMATIC1111 "infotext" (prompt, ``Negative prompt: ...`` and a last
  line of ``Key: value`` pairs), so the file can be dropped into A1111 / Forge / ComfyUI readers;
* ``latent_studio`` -- the exact settings dict as JSON, so our own app can restore everything.

Nothing here touches the disk at import time, and no torch is needed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from PIL import Image, PngImagePlugin

__all__ = [
    "INFOTEXT_KEY",
    "MAX_INFOTEXT_BYTES",
    "MAX_PIXELS",
    "MAX_PNG_BYTES",
    "MAX_SETTINGS_BYTES",
    "SETTINGS_KEY",
    "PngMetadata",
    "encode_png",
    "format_infotext",
    "open_png",
    "parse_infotext",
    "read_png",
    "write_png",
]

INFOTEXT_KEY = "parameters"
SETTINGS_KEY = "latent_studio"

#: Largest infotext we parse or write (UTF-8 bytes).
MAX_INFOTEXT_BYTES = 64 * 1024
#: Largest settings JSON we read or write (UTF-8 bytes).
MAX_SETTINGS_BYTES = 1024 * 1024
#: Largest image we decode (width * height); refuses decompression bombs.
MAX_PIXELS = 4096 * 4096
#: Largest PNG file we read at all.
MAX_PNG_BYTES = 64 * 1024 * 1024

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_NEGATIVE_PREFIX = "Negative prompt:"
# Keys that, on their own, make a last line a parameter line even with fewer than 3 pairs.
_KNOWN_KEYS = frozenset(
    {
        "Steps",
        "Sampler",
        "Schedule type",
        "CFG scale",
        "Seed",
        "Size",
        "Model",
        "Model hash",
        "Denoising strength",
    }
)
_INT_KEYS = ("Steps", "Seed")
_FLOAT_KEYS = ("CFG scale",)
_MAX_SEED_DIGITS = 20
# Image modes PIL can write to PNG unchanged.
_PNG_MODES = frozenset({"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"})


# --------------------------------------------------------------------------------------------
# Infotext
# --------------------------------------------------------------------------------------------


def _is_key_char(ch: str) -> bool:
    # A1111's key pattern is ``\w[\w \-/]+``.
    return ch.isalnum() or ch in "_ -/"


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def _quote(value: str) -> str:
    """Quote a value the way A1111 does (JSON string), plus the cases its parser would mangle."""
    if any(c in value for c in ',:\n\r"') or value != value.strip():
        return json.dumps(value, ensure_ascii=False)
    return value


def _value_to_str(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int | float | str):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"Infotext value for {key!r} must be a finite number, got {value!r}.")
        return str(value)
    raise ValueError(f"Infotext value for {key!r} must be a string or number, got {type(value).__name__}.")


def _check_key(key: Any) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError(f"Infotext keys must be non-empty strings, got {key!r}.")
    if not _is_word_char(key[0]) or key.endswith(" ") or not all(_is_key_char(c) for c in key):
        raise ValueError(
            f"Infotext key {key!r} is not allowed: use letters, digits, spaces, '_', '-' or '/', "
            "starting with a letter or digit."
        )
    return key


def format_infotext(prompt: str, negative_prompt: str, params: dict[str, Any]) -> str:
    """Build an AUTOMATIC1111 ``parameters`` infotext.

    ``params`` is ordered ``{"Steps": 25, "Sampler": "DPM++ 2M", "CFG scale": 7.5, "Seed": 1,
    "Size": "512x512", "Model": "name", ...}``; ``None`` values are skipped. Instead of ``Size``
    you may pass ``width`` and ``height`` (as :func:`parse_infotext` returns them); the ``Size``
    entry is written where ``width`` appears. ``prompt``/``negative_prompt`` keys are ignored, so
    the dict from :func:`parse_infotext` round-trips.
    """
    if not isinstance(prompt, str) or not isinstance(negative_prompt, str):
        raise ValueError("The prompt and negative prompt must be strings.")
    if not isinstance(params, dict):
        raise ValueError("Infotext parameters must be a dict.")
    parts: list[str] = []
    for key, value in params.items():
        if key in ("prompt", "negative_prompt", "height") or value is None:
            continue
        if key == "width":
            height = params.get("height")
            if height is None:
                raise ValueError("Infotext parameters have 'width' but no 'height'.")
            parts.append(f"Size: {_value_to_str('width', value)}x{_value_to_str('height', height)}")
            continue
        _check_key(key)
        text = _value_to_str(key, value)
        parts.append(key if text == key else f"{key}: {_quote(text)}")
    negative = f"\n{_NEGATIVE_PREFIX} {negative_prompt}" if negative_prompt else ""
    result = f"{prompt}{negative}\n{', '.join(parts)}".strip()
    if len(result.encode("utf-8", "surrogatepass")) > MAX_INFOTEXT_BYTES:
        raise ValueError(f"The infotext is longer than {MAX_INFOTEXT_BYTES // 1024} KiB.")
    return result


def _scan_params(line: str) -> tuple[list[tuple[str, str]], int]:
    """Split an A1111 parameter line into (key, value) pairs in one linear pass.

    Returns the pairs and the number of segments that were not ``key: value``. Quoted values
    are JSON strings (``"a: b, c: d"``); a quote that doesn't close is taken literally.
    """
    pairs: list[tuple[str, str]] = []
    junk = 0
    n = len(line)
    pos = 0
    while pos < n:
        while pos < n and line[pos].isspace():
            pos += 1
        if pos >= n:
            break
        start = pos
        if _is_word_char(line[pos]):
            while pos < n and _is_key_char(line[pos]):
                pos += 1
        if pos == start or pos >= n or line[pos] != ":":
            # Not "key:" -- a bare word (A1111 writes ``k`` when k == v) or junk.
            comma = line.find(",", pos)
            end = n if comma < 0 else comma
            segment = line[start:end].strip()
            if segment and all(_is_key_char(c) for c in segment) and _is_word_char(segment[0]):
                pairs.append((segment, segment))
            elif segment:
                junk += 1
            pos = end + 1
            continue
        key = line[start:pos].strip()
        pos += 1
        while pos < n and line[pos] in " \t":
            pos += 1
        value: str | None = None
        if pos < n and line[pos] == '"':
            j = pos + 1
            while j < n:
                c = line[j]
                if c == "\\":
                    j += 2
                elif c == '"':
                    break
                else:
                    j += 1
            if j < n:
                k = j + 1
                while k < n and line[k] in " \t":
                    k += 1
                if k >= n or line[k] == ",":
                    raw = line[pos : j + 1]
                    try:
                        decoded = json.loads(raw)
                        decoded.encode("utf-8")  # lone surrogates from \ud800 escapes
                        value = decoded
                    except (ValueError, AttributeError):
                        value = raw
                    pos = k + 1
        if value is None:
            comma = line.find(",", pos)
            end = n if comma < 0 else comma
            value = line[pos:end].strip()
            pos = end + 1
        pairs.append((key, value))
    return pairs, junk


def _parse_int(key: str, value: str, *, max_digits: int) -> int:
    text = value.strip()
    digits = text.lstrip("+-")
    if not digits.isdigit() or not digits.isascii() or len(digits) > max_digits:
        raise ValueError(f"Infotext {key!r} must be a whole number, got {value[:40]!r}.")
    return int(text)


def _parse_float(key: str, value: str) -> float:
    text = value.strip()
    try:
        if len(text) > 40:
            raise ValueError
        number = float(text)
    except ValueError:
        raise ValueError(f"Infotext {key!r} must be a number, got {value[:40]!r}.") from None
    if not math.isfinite(number):
        raise ValueError(f"Infotext {key!r} must be a finite number, got {value[:40]!r}.")
    return number


def _parse_size(value: str) -> tuple[int, int]:
    w, sep, h = value.strip().partition("x")
    if not sep or not (w.isascii() and w.isdigit() and h.isascii() and h.isdigit()) or len(w + h) > 12:
        raise ValueError(f"Infotext 'Size' must look like 512x768, got {value[:40]!r}.")
    return int(w), int(h)


def parse_infotext(text: str | bytes) -> dict[str, Any]:
    """Parse an AUTOMATIC1111 infotext (the inverse of :func:`format_infotext`).

    Returns ``{"prompt", "negative_prompt", <every key of the parameter line>}`` with ``Steps`` and
    ``Seed`` as ints, ``CFG scale`` as float and ``Size`` replaced by ``width``/``height`` ints.
    Raises only :class:`ValueError` (with a readable message) on bad input.
    """
    if isinstance(text, bytes | bytearray):
        if len(text) > MAX_INFOTEXT_BYTES:
            raise ValueError(f"The infotext is longer than {MAX_INFOTEXT_BYTES // 1024} KiB.")
        text = bytes(text).decode("utf-8", "replace")
    if not isinstance(text, str):
        raise ValueError(f"The infotext must be text, got {type(text).__name__}.")
    if len(text) > MAX_INFOTEXT_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_INFOTEXT_BYTES:
        raise ValueError(f"The infotext is longer than {MAX_INFOTEXT_BYTES // 1024} KiB.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("The infotext contains invalid Unicode (unpaired surrogates).") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "").strip()

    lines = text.split("\n")
    last = lines[-1]
    pairs: list[tuple[str, str]] = []
    if not last.lstrip().startswith(_NEGATIVE_PREFIX):
        pairs, junk = _scan_params(last)
        real = [k for k, v in pairs if k != v]
        # A1111 wants at least 3 pairs; a shorter line counts only if it is all known-looking pairs.
        short_ok = real and len(real) == len(pairs) and junk == 0 and any(k in _KNOWN_KEYS for k in real)
        if len(real) >= 3 or short_ok:
            lines = lines[:-1]
        else:
            pairs = []

    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in lines:
        if not in_negative and line.lstrip().startswith(_NEGATIVE_PREFIX):
            in_negative = True
            line = line.lstrip()[len(_NEGATIVE_PREFIX) :]
            if line.startswith(" "):
                line = line[1:]
        (negative_lines if in_negative else prompt_lines).append(line)

    result: dict[str, Any] = {
        "prompt": "\n".join(prompt_lines).strip(),
        "negative_prompt": "\n".join(negative_lines).strip(),
    }
    for key, value in pairs:
        if key in ("prompt", "negative_prompt", "width", "height"):
            continue  # would shadow our own fields
        if key == "Size":
            result["width"], result["height"] = _parse_size(value)
        elif key in _INT_KEYS:
            result[key] = _parse_int(key, value, max_digits=_MAX_SEED_DIGITS if key == "Seed" else 9)
        elif key in _FLOAT_KEYS:
            result[key] = _parse_float(key, value)
        else:
            result[key] = value
    return result


# --------------------------------------------------------------------------------------------
# PNG files
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PngMetadata:
    """Text metadata read from a PNG; a field is ``None`` when absent, oversized or invalid."""

    infotext: str | None
    settings: dict[str, Any] | None


def _settings_json(settings: dict[str, Any]) -> str:
    if not isinstance(settings, dict):
        raise ValueError("Settings must be a dict.")
    try:
        data = json.dumps(settings, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"Settings can't be stored as JSON: {exc}.") from None
    if len(data) > MAX_SETTINGS_BYTES:
        raise ValueError(f"Settings JSON is larger than {MAX_SETTINGS_BYTES // 1024} KiB.")
    return data


def encode_png(image: Image.Image, infotext: str, settings: dict[str, Any]) -> bytes:
    """Encode ``image`` as PNG bytes carrying the ``parameters`` and ``latent_studio`` chunks."""
    if not isinstance(image, Image.Image):
        raise ValueError("Expected a PIL image.")
    if not isinstance(infotext, str):
        raise ValueError("The infotext must be a string.")
    try:
        infotext_size = len(infotext.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError("The infotext contains invalid Unicode (unpaired surrogates).") from None
    if infotext_size > MAX_INFOTEXT_BYTES:
        raise ValueError(f"The infotext is longer than {MAX_INFOTEXT_BYTES // 1024} KiB.")
    if image.width * image.height > MAX_PIXELS:
        raise ValueError(
            f"The image is too large ({image.width}x{image.height}); the limit is {MAX_PIXELS} pixels."
        )
    info = PngImagePlugin.PngInfo()
    info.add_text(INFOTEXT_KEY, infotext)  # tEXt when latin-1, otherwise iTXt (as A1111 does)
    info.add_text(SETTINGS_KEY, _settings_json(settings))
    if image.mode not in _PNG_MODES:
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories can't be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same folder, fsync, ``os.replace``."""
    target = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            with contextlib.suppress(
                OSError, AttributeError
            ):  # mkstemp makes 0600; images are ordinary files
                os.fchmod(fh.fileno(), 0o644)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(target.parent)


def write_png(
    path: str | os.PathLike[str], image: Image.Image, infotext: str, settings: dict[str, Any]
) -> str:
    """Atomically write ``image`` as a PNG with its metadata; returns the file's SHA-256 (hex)."""
    data = encode_png(image, infotext, settings)
    write_bytes_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def _read_source(source: str | os.PathLike[str] | bytes | IO[bytes]) -> bytes:
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
    elif isinstance(source, str | os.PathLike):
        try:
            with open(source, "rb") as fh:
                data = fh.read(MAX_PNG_BYTES + 1)
        except OSError as exc:
            raise ValueError(f"Can't read the image file: {exc.strerror or exc}.") from None
    elif hasattr(source, "read"):
        try:
            data = source.read(MAX_PNG_BYTES + 1)
        except Exception as exc:
            raise ValueError(f"Can't read the image file: {exc}.") from None
        if not isinstance(data, bytes | bytearray):
            raise ValueError("The image file must be opened in binary mode.")
        data = bytes(data)
    else:
        raise ValueError(f"Expected a path or a binary file, got {type(source).__name__}.")
    if len(data) > MAX_PNG_BYTES:
        raise ValueError(f"The image file is larger than {MAX_PNG_BYTES // (1024 * 1024)} MiB.")
    return data


def _check_png_header(data: bytes) -> tuple[int, int]:
    if len(data) < 33 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise ValueError("This is not a readable image: expected a PNG file.")
    width, height = struct.unpack(">II", data[16:24])
    if zlib.crc32(data[12:29]) != struct.unpack(">I", data[29:33])[0]:
        raise ValueError("This is not a readable image: the PNG header is corrupt.")
    if width == 0 or height == 0:
        raise ValueError("This is not a readable image: it has no pixels.")
    if width * height > MAX_PIXELS:
        raise ValueError(
            f"The image is too large ({width}x{height}); the limit is {MAX_PIXELS:,} pixels "
            "(possible decompression bomb)."
        )
    _check_chunks(data)
    return width, height


def _check_chunks(data: bytes) -> None:
    """Walk every chunk: lengths must fit, CRCs must match and the file must end with IEND."""
    pos = len(_PNG_SIGNATURE)
    view = memoryview(data)
    while True:
        if pos + 12 > len(data):
            raise ValueError("This is not a readable image: the PNG file is truncated.")
        (length,) = struct.unpack_from(">I", data, pos)
        end = pos + 8 + length
        if end + 4 > len(data):
            raise ValueError("This is not a readable image: the PNG file is truncated.")
        if zlib.crc32(view[pos + 4 : end]) != struct.unpack_from(">I", data, end)[0]:
            raise ValueError("This is not a readable image: a PNG chunk is corrupt (bad CRC).")
        if data[pos + 4 : pos + 8] == b"IEND":
            return
        pos = end + 4


def _metadata_from(image: Image.Image) -> PngMetadata:
    texts = getattr(image, "text", None) or {}
    infotext = texts.get(INFOTEXT_KEY)
    if infotext is not None:
        infotext = str(infotext)
        if len(infotext.encode("utf-8", "surrogatepass")) > MAX_INFOTEXT_BYTES:
            infotext = None
    settings: dict[str, Any] | None = None
    raw = texts.get(SETTINGS_KEY)
    if raw is not None and len(raw) <= MAX_SETTINGS_BYTES:
        try:
            parsed = json.loads(str(raw))
        except (ValueError, RecursionError):
            parsed = None
        settings = parsed if isinstance(parsed, dict) else None
    return PngMetadata(infotext=infotext, settings=settings)


def open_png(source: str | os.PathLike[str] | bytes | IO[bytes]) -> tuple[Image.Image, PngMetadata]:
    """Read, fully decode and validate a PNG; returns the loaded image and its metadata.

    Raises :class:`ValueError` for non-PNG or corrupt files and for images over
    :data:`MAX_PIXELS` (checked from the header before any pixel is decoded).
    """
    data = _read_source(source)
    _check_png_header(data)
    try:
        image = Image.open(io.BytesIO(data), formats=["PNG"])
        if image.width * image.height > MAX_PIXELS:  # e.g. an APNG frame larger than IHDR claims
            raise ValueError(f"The image is too large ({image.width}x{image.height}).")
        image.load()
        metadata = _metadata_from(image)
    except ValueError as exc:
        if str(exc).startswith("The image is too large"):
            raise
        if "too large" in str(exc) or "too much memory" in str(exc).lower():
            raise ValueError("The image has an oversized text chunk.") from None
        raise ValueError(f"This is not a readable image: {exc}.") from None
    except Image.DecompressionBombError:
        raise ValueError("The image is too large (possible decompression bomb).") from None
    except MemoryError:
        raise ValueError("The image is too large to decode.") from None
    except Exception as exc:  # OSError, SyntaxError, EOFError, zlib.error, struct.error, ...
        raise ValueError(f"This is not a readable image: {exc or type(exc).__name__}.") from None
    return image, metadata


def read_png(source: str | os.PathLike[str] | bytes | IO[bytes]) -> PngMetadata:
    """Read the ``parameters`` infotext and ``latent_studio`` settings from a PNG.

    The file is fully validated (see :func:`open_png`). Oversized text chunks come back as
    ``None``; so does settings JSON that is invalid or not an object.
    """
    image, metadata = open_png(source)
    image.close()
    return metadata
