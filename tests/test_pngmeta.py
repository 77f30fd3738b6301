"""Tests for studio.pngmeta: A1111 infotext and PNG metadata chunks."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import struct
import time
import zlib

import pytest
from PIL import Image, PngImagePlugin

from studio import pngmeta
from studio.pngmeta import PngMetadata, format_infotext, parse_infotext, read_png, write_png

A1111_INFOTEXT = (
    "masterpiece, best quality, 1girl, red hair,\n"
    "<lora:add_detail:0.8>, (looking at viewer:1.2), café\n"
    "Negative prompt: lowres, bad anatomy,\n"
    "worst quality, (blurry:1.3)\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3389442010, "
    "Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, "
    "Denoising strength: 0.45, Clip skip: 2, Hires upscale: 2, Hires steps: 10, "
    'Hires upscaler: R-ESRGAN 4x+ Anime6B, Lora hashes: "add_detail: 7c6bad76eb54, style: 0a1b2c3d4e5f", '
    'TI hashes: "easynegative: c74b4e810b03", Version: v1.10.1'
)


def _png_bytes(size=(4, 4), **text: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _insert_chunk_before_idat(png: bytes, chunk: bytes) -> bytes:
    at = png.index(b"IDAT") - 4
    return png[:at] + chunk + png[at:]


# --- infotext ----------------------------------------------------------------------------------


def test_format_infotext_layout():
    text = format_infotext(
        "a cat",
        "blurry",
        {
            "Steps": 25,
            "Sampler": "DPM++ 2M",
            "Schedule type": "Karras",
            "CFG scale": 7.5,
            "Seed": 123,
            "Size": "512x512",
            "Model": "name",
            "Skipped": None,
        },
    )
    assert text == (
        "a cat\nNegative prompt: blurry\n"
        "Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 123, "
        "Size: 512x512, Model: name"
    )


def test_format_omits_empty_negative_and_quotes_like_a1111():
    text = format_infotext("p", "", {"Steps": 1, "Lora hashes": "a: b, c: d", "Note": 'say "hi"'})
    assert text == 'p\nSteps: 1, Lora hashes: "a: b, c: d", Note: "say \\"hi\\""'
    assert "Negative prompt" not in text


def test_simple_round_trip():
    params = {"Steps": 25, "Sampler": "Euler a", "CFG scale": 7.5, "Seed": 42, "width": 640, "height": 384}
    text = format_infotext("a cat\non two lines", "dog, ugly", params)
    assert "Size: 640x384" in text
    parsed = parse_infotext(text)
    assert parsed == {"prompt": "a cat\non two lines", "negative_prompt": "dog, ugly", **params}
    assert format_infotext(parsed["prompt"], parsed["negative_prompt"], parsed) == text


def test_parse_real_a1111_infotext():
    parsed = parse_infotext(A1111_INFOTEXT)
    assert parsed["prompt"] == (
        "masterpiece, best quality, 1girl, red hair,\n<lora:add_detail:0.8>, (looking at viewer:1.2), café"
    )
    assert parsed["negative_prompt"] == "lowres, bad anatomy,\nworst quality, (blurry:1.3)"
    assert parsed["Steps"] == 28 and isinstance(parsed["Steps"], int)
    assert parsed["Seed"] == 3389442010
    assert parsed["CFG scale"] == 7.0 and isinstance(parsed["CFG scale"], float)
    assert (parsed["width"], parsed["height"]) == (512, 768)
    assert "Size" not in parsed
    assert parsed["Sampler"] == "DPM++ 2M"
    assert parsed["Schedule type"] == "Karras"
    assert parsed["Model"] == "v1-5-pruned-emaonly"
    assert parsed["Lora hashes"] == "add_detail: 7c6bad76eb54, style: 0a1b2c3d4e5f"
    assert parsed["TI hashes"] == "easynegative: c74b4e810b03"
    assert parsed["Hires upscaler"] == "R-ESRGAN 4x+ Anime6B"
    assert parsed["Hires upscale"] == "2" and parsed["Denoising strength"] == "0.45"
    assert parsed["Version"] == "v1.10.1"
    # format -> parse is stable
    again = format_infotext(parsed["prompt"], parsed["negative_prompt"], parsed)
    assert parse_infotext(again) == parsed


def test_parse_without_negative_and_crlf():
    parsed = parse_infotext("a dog\r\nSteps: 20, Sampler: Euler, CFG scale: 5, Seed: -1, Size: 64x64\r\n")
    assert parsed["prompt"] == "a dog"
    assert parsed["negative_prompt"] == ""
    assert parsed["Seed"] == -1
    assert parsed["width"] == 64


def test_parse_prompt_only_and_empty_prompt():
    assert parse_infotext("just a prompt, with commas: and colons") == {
        "prompt": "just a prompt, with commas: and colons",
        "negative_prompt": "",
    }
    parsed = parse_infotext("Negative prompt: bad\nSteps: 3, Seed: 4, Size: 8x8")
    assert parsed["prompt"] == "" and parsed["negative_prompt"] == "bad" and parsed["Steps"] == 3


def test_unicode_and_escaped_values_round_trip():
    params = {"Steps": 2, "Note": 'quote " and \\ backslash, comma: colon\nnewline', "Émoji": "🎨 ok"}
    text = format_infotext("猫 🐱", "", params)
    assert text.count("\n") == 1
    parsed = parse_infotext(text)
    assert parsed["prompt"] == "猫 🐱"
    assert parsed["Note"] == params["Note"]
    assert parsed["Émoji"] == "🎨 ok"


def test_format_rejects_bad_keys_and_values():
    with pytest.raises(ValueError):
        format_infotext("p", "", {"bad: key": 1})
    with pytest.raises(ValueError):
        format_infotext("p", "", {"Steps": [1, 2]})
    with pytest.raises(ValueError):
        format_infotext("p", "", {"CFG scale": float("nan")})


@pytest.mark.parametrize(
    "text",
    [
        "x\nSteps: many, Sampler: a, Seed: 1",
        "x\nSteps: 1, Sampler: a, Seed: 1" + "9" * 30,
        "x\nSteps: 1, Sampler: a, CFG scale: inf",
        "x\nSteps: 1, Sampler: a, Size: 512by512",
        "a" * (64 * 1024 + 1),
        "\ud800 lone surrogate",
        12345,
        None,
    ],
)
def test_parse_bad_input_raises_value_error(text):
    with pytest.raises(ValueError) as info:
        parse_infotext(text)
    assert str(info.value)  # a message, not a bare exception


def test_parse_garbage_never_raises_anything_else():
    rng = random.Random(1234)
    alphabet = 'abc :,"\\\n\r\t0123456789xX-/_é🎨\x00{}[]'
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 120)))
        try:
            parsed = parse_infotext(text)
        except ValueError:
            continue
        assert isinstance(parsed["prompt"], str)
    for blob in (bytes(rng.randrange(256) for _ in range(500)), b"\xff\xfe" * 100):
        try:
            parse_infotext(blob)
        except ValueError:
            pass


def test_parse_is_linear_on_adversarial_lines():
    nasty = [
        "a" * 60_000,  # one long key-ish word, no colon
        "a " * 30_000,
        "k: " + '"' + "\\" * 30_000,  # unterminated quoted value
        "x\n" + "k: v, " * 9_000,
        ('a: "' * 15_000)[:60_000],
    ]
    for text in nasty:
        start = time.perf_counter()
        try:
            parse_infotext(text)
        except ValueError:
            pass
        assert time.perf_counter() - start < 2.0


# --- PNG files ---------------------------------------------------------------------------------


def test_write_and_read_png_round_trip(tmp_path):
    path = tmp_path / "out.png"
    settings = {"technique": "txt2img", "seed": 7, "prompt": "猫", "nested": {"a": [1, 2.5, None]}}
    infotext = format_infotext("猫 café", "no", {"Steps": 3, "Seed": 7})
    digest = write_png(path, Image.new("RGBA", (16, 8), (1, 2, 3, 4)), infotext, settings)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sorted(os.listdir(tmp_path)) == ["out.png"]  # no temp files left
    meta = read_png(path)
    assert meta == PngMetadata(infotext=infotext, settings=settings)
    with open(path, "rb") as fh:
        assert read_png(fh) == meta
    with Image.open(path) as im:  # what A1111 / other readers see
        assert im.info["parameters"] == infotext
        assert im.size == (16, 8)


def test_write_png_is_atomic_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "out.png"
    write_png(path, Image.new("RGB", (4, 4)), "first", {})

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(pngmeta.os, "replace", broken_replace)
    with pytest.raises(OSError):
        write_png(path, Image.new("RGB", (4, 4)), "second", {})
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["out.png"]
    assert read_png(path).infotext == "first"


def test_write_png_rejects_unserialisable_settings(tmp_path):
    with pytest.raises(ValueError, match="JSON"):
        write_png(tmp_path / "x.png", Image.new("RGB", (2, 2)), "", {"x": object()})
    assert not any(tmp_path.iterdir())


def test_decompression_bomb_header_refused(tmp_path):
    data = bytearray(_png_bytes(parameters="bomb"))
    struct.pack_into(">II", data, 16, 100_000, 100_000)  # IHDR width/height
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))  # fix the IHDR CRC
    path = tmp_path / "bomb.png"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="too large"):
        read_png(path)
    # PIL itself would also refuse, but our check comes first (no PIL exception types leak)
    with pytest.raises(ValueError, match="too large"):
        read_png(io.BytesIO(bytes(data)))


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"hello, I am a text file" * 10,
        b"GIF89a" + b"\x00" * 100,
        _png_bytes()[:60],  # truncated inside IDAT
        _png_bytes()[:8] + b"\x00" * 40,  # signature, no IHDR
    ],
)
def test_non_images_refused(tmp_path, payload):
    path = tmp_path / "x.png"
    path.write_bytes(payload)
    with pytest.raises(ValueError, match="not a readable image"):
        read_png(path)


def test_corrupt_chunk_crc_refused():
    data = bytearray(_png_bytes(parameters="x"))
    at = data.index(b"IDAT") + 6
    data[at] ^= 0xFF  # flip a byte inside the compressed pixel data
    with pytest.raises(ValueError, match="not a readable image"):
        read_png(io.BytesIO(bytes(data)))


def test_jpeg_is_not_a_png(tmp_path):
    path = tmp_path / "x.jpg"
    Image.new("RGB", (4, 4)).save(path, format="JPEG")
    with pytest.raises(ValueError, match="not a readable image"):
        read_png(path)


def test_missing_file_is_value_error(tmp_path):
    with pytest.raises(ValueError):
        read_png(tmp_path / "nope.png")


def test_invalid_settings_json_and_oversized_text(tmp_path):
    png = _png_bytes(parameters="ok", latent_studio="{not json")
    assert read_png(io.BytesIO(png)) == PngMetadata(infotext="ok", settings=None)
    png = _png_bytes(latent_studio=json.dumps([1, 2]))  # valid JSON, not an object
    assert read_png(io.BytesIO(png)).settings is None
    png = _png_bytes(parameters="x" * (pngmeta.MAX_INFOTEXT_BYTES + 10))
    assert read_png(io.BytesIO(png)).infotext is None


def test_compressed_text_bomb_refused():
    bomb = _chunk(b"zTXt", b"parameters\x00\x00" + zlib.compress(b"a" * 20_000_000))
    with pytest.raises(ValueError, match="oversized text chunk"):
        read_png(io.BytesIO(_insert_chunk_before_idat(_png_bytes(), bomb)))


def test_a1111_png_reads_parameters_only():
    meta = read_png(io.BytesIO(_png_bytes(parameters=A1111_INFOTEXT)))
    assert meta.settings is None
    assert parse_infotext(meta.infotext)["Seed"] == 3389442010
