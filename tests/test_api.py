"""The full app, launched as `python app.py` launches it, driven through gradio_client.

Uses the trained `toy-sd` once it exists, else the tiny random pipeline (see tests/e2e.py).
"""

from __future__ import annotations

import io
import json
import struct
import urllib.request
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
from e2e import pick_model, serve, server_tracebacks
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

API_NAMES = {
    "/txt2img",
    "/gallery_search",
    "/gallery_item",
    "/gallery_delete",
    "/gallery_favourite",
    "/gallery_import",
}
PROMPT = "a red circle on the left"


@pytest.fixture(scope="module")
def model(request) -> str:
    return pick_model(request)


@pytest.fixture(scope="module")
def app(model, tmp_path_factory):
    with serve(tmp_path_factory.mktemp("e2e_api"), model) as (url, studio):
        client = Client(url, verbose=False)
        yield SimpleNamespace(url=url, studio=studio, client=client, model=model)


def settings(app, **changes) -> dict:
    base = {"prompt": PROMPT, "model": app.model, "steps": 4, "seed": 11, "width": 64, "height": 64}
    base.update(changes)
    return base


def generate(app, s: dict):
    images, info = app.client.predict(s, api_name="/txt2img")
    return [entry["image"] for entry in images], info


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_named_endpoints(app):
    endpoints = app.client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert API_NAMES <= set(endpoints)


def test_txt2img_stores_searches_and_remakes(app):
    paths, info = generate(app, settings(app))
    assert len(paths) == 1 and len(info["ids"]) == 1
    with Image.open(paths[0]) as image:
        assert image.format == "PNG"
        assert image.size == (64, 64)
    assert info["seeds"] == [11]
    assert info["settings"][0]["seed"] == 11
    assert info["settings"][0]["prompt"] == PROMPT

    items, total = app.client.predict("circle", api_name="/gallery_search")
    assert total >= 1
    found = [item for item in items if item["id"] == info["ids"][0]]
    assert found and found[0]["prompt"] == PROMPT and found[0]["seed"] == 11

    item = app.client.predict(info["ids"][0], api_name="/gallery_item")
    assert item["settings"] == info["settings"][0]
    assert (item["seed"], item["steps"], item["width"], item["height"]) == (11, 4, 64, 64)

    remade_paths, remade = generate(app, item["settings"])
    assert remade["seeds"] == [11]
    assert remade["settings"][0] == info["settings"][0]
    assert np.array_equal(pixels(remade_paths[0]), pixels(paths[0]))
    assert np.array_equal(pixels(item["image_path"]), pixels(paths[0]))


BAD_INPUT = {
    "empty prompt": ({"prompt": ""}, "prompt is empty"),
    "blank prompt": ({"prompt": "   \n "}, "prompt is empty"),
    "10,000-character prompt": ({"prompt": "a" * 10_000}, "prompt has 10000 characters; the limit is 4000"),
    "width 7": ({"width": 7}, "width must be between 8 and 4096"),
    "width 100000": ({"width": 100000}, "width must be between 8 and 4096"),
    "width not a multiple of 8": ({"width": 65}, "width must be a multiple of 8"),
    "steps 0": ({"steps": 0}, "steps must be between 1 and 150"),
    "steps -1": ({"steps": -1}, "steps must be between 1 and 150"),
    "steps as text": ({"steps": "4"}, "steps must be a whole number"),
    "guidance 'nan'": ({"guidance": "nan"}, "guidance must be a number"),
    "unknown scheduler": ({"scheduler": "Warp Drive"}, "unknown scheduler 'Warp Drive'"),
    "unknown model": ({"model": "no-such-model"}, "unknown model 'no-such-model'"),
    "pickle checkpoint": ({"model": "evil.ckpt"}, "pickle checkpoint"),
    "unknown key": ({"colour": "red"}, "unknown settings: colour"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_a_clear_error(app, case, capfd):
    changes, phrase = BAD_INPUT[case]
    before = app.studio.gallery.count()
    with pytest.raises(AppError) as caught:
        generate(app, settings(app, **changes))
    message = str(caught.value)
    assert phrase in message
    assert "Traceback" not in message and 'File "' not in message
    assert len(message) < 600
    assert app.studio.gallery.count() == before
    assert server_tracebacks(capfd) == ""


def test_float_nan_guidance(app, capfd):
    """gradio_client refuses to put NaN in JSON; a raw request carrying a NaN literal gets a clear error."""
    before = app.studio.gallery.count()
    with pytest.raises((ValueError, AppError)):
        generate(app, settings(app, guidance=float("nan")))
    # Python's json module (the server's parser) reads the non-standard `NaN` literal.
    body = json.dumps({"data": [settings(app, guidance=float("nan"))]}).encode()
    assert b"NaN" in body
    request = urllib.request.Request(
        app.url + "gradio_api/call/txt2img", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        event_id = json.loads(response.read())["event_id"]
    with urllib.request.urlopen(f"{app.url}gradio_api/call/txt2img/{event_id}", timeout=120) as response:
        stream = response.read().decode()
    assert "event: error" in stream
    assert "guidance must be a finite number" in stream
    assert "Traceback" not in stream
    assert app.studio.gallery.count() == before
    assert server_tracebacks(capfd) == ""


def _png_bytes(size=(8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_import_corrupt_png_is_refused(app, tmp_path, capfd):
    data = bytearray(_png_bytes())
    data[40:60] = b"\x00" * 20  # inside the IDAT chunk: its CRC no longer matches
    path = tmp_path / "corrupt.png"
    path.write_bytes(bytes(data))
    before = app.studio.gallery.count()
    with pytest.raises(AppError, match="not a readable image") as caught:
        app.client.predict(handle_file(str(path)), api_name="/gallery_import")
    assert "Traceback" not in str(caught.value)
    assert app.studio.gallery.count() == before
    assert server_tracebacks(capfd) == ""


def test_import_truncated_png_is_refused(app, tmp_path, capfd):
    path = tmp_path / "truncated.png"
    path.write_bytes(_png_bytes()[:50])
    before = app.studio.gallery.count()
    with pytest.raises(AppError, match="not a readable image"):
        app.client.predict(handle_file(str(path)), api_name="/gallery_import")
    assert app.studio.gallery.count() == before
    assert server_tracebacks(capfd) == ""


def test_import_decompression_bomb_is_refused(app, tmp_path, capfd):
    data = bytearray(_png_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", 100_000, 100_000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path = tmp_path / "bomb.png"
    path.write_bytes(bytes(data))
    before = app.studio.gallery.count()
    files_before = sorted(p.name for p in app.studio.paths.images.iterdir())
    with pytest.raises(AppError, match="too large") as caught:
        app.client.predict(handle_file(str(path)), api_name="/gallery_import")
    assert "decompression bomb" in str(caught.value)
    assert app.studio.gallery.count() == before
    assert sorted(p.name for p in app.studio.paths.images.iterdir()) == files_before
    assert server_tracebacks(capfd) == ""


def test_app_still_serves_after_bad_input(app):
    """Runs last: every refused request above left the app working and the gallery as it was."""
    items, total = app.client.predict("", api_name="/gallery_search")
    assert total == app.studio.gallery.count() == len(items)
    # Only test_txt2img_stores_searches_and_remakes stored anything (an image and its remake).
    assert all(item["prompt"] == PROMPT for item in items)
    paths, info = generate(app, settings(app, prompt="a green square", seed=5))
    assert app.studio.gallery.count() == total + 1
    assert info["seeds"] == [5]
