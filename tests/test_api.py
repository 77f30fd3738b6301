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
    "/sdedit",
    "/ip2p",
    "/p2p",
    "/controlnet",
    "/ip_adapter",
    "/instantid",
    "/evaluate",
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


# ---------------------------------------------------------------- editing (SDEdit, InstructPix2Pix)


@pytest.fixture(scope="module")
def source_png(tmp_path_factory) -> str:
    """A 70×60 picture: fitting crops it to 64×56."""
    path = tmp_path_factory.mktemp("edit_input") / "input.png"
    image = Image.new("RGB", (70, 60), (255, 255, 255))
    image.paste((220, 30, 30), (20, 15, 50, 45))
    image.save(path)
    return str(path)


def edit(app, api_name: str, image, s: dict):
    images, info = app.client.predict(handle_file(image) if image is not None else None, s, api_name=api_name)
    return [entry["image"] for entry in images], info


def sdedit_settings(tiny_sd, **changes) -> dict:
    base = {
        "prompt": "a blue circle in the center",
        "model": str(tiny_sd),
        "steps": 4,
        "seed": 3,
        "strength": 0.5,
    }
    base.update(changes)
    return base


def ip2p_settings(tiny_ip2p, **changes) -> dict:
    base = {"instruction": "make the square blue", "model": str(tiny_ip2p), "steps": 3, "seed": 4}
    base.update({"guidance": 5.0, "image_guidance": 1.5}, **changes)
    return base


def test_sdedit_stores_its_results_under_the_upload(app, tiny_sd, source_png):
    before = app.studio.gallery.count()
    paths, info = edit(app, "/sdedit", source_png, sdedit_settings(tiny_sd))
    assert len(paths) == 1 and info["seeds"] == [3] and len(info["ids"]) == 1
    with Image.open(paths[0]) as image:
        assert image.format == "PNG" and image.size == (64, 56)
    assert app.studio.gallery.count() == before + 2  # the upload and the edit
    upload = app.studio.gallery.get(info["parent_id"])
    assert upload.technique == "upload" and (upload.width, upload.height) == (70, 60)
    item = app.studio.gallery.get(info["ids"][0])
    assert item.technique == "sdedit" and item.parent_id == upload.id
    assert info["settings"][0]["source_id"] == upload.id and info["settings"][0]["strength"] == 0.5
    assert "input cropped 70×60 to 64×56 (centre)" in info["notes"]
    assert "2 of 4 steps run (strength 0.5)" in info["notes"]

    # No file: the gallery item named by source_id is the input, and the parent of the result.
    again, info2 = edit(app, "/sdedit", None, sdedit_settings(tiny_sd, source_id=item.id, seed=5))
    assert info2["parent_id"] == item.id and info2["seeds"] == [5]
    assert app.studio.gallery.get(info2["ids"][0]).parent_id == item.id
    assert app.studio.gallery.count() == before + 3  # nothing new was uploaded


def test_ip2p_stores_its_results_under_the_upload(app, tiny_ip2p, source_png):
    before = app.studio.gallery.count()
    paths, info = edit(app, "/ip2p", source_png, ip2p_settings(tiny_ip2p, batch_size=2))
    assert len(paths) == 2 and info["seeds"] == [4, 5]
    assert app.studio.gallery.count() == before + 3  # the upload and two edits
    upload = app.studio.gallery.get(info["parent_id"])
    assert upload.technique == "upload"
    for item_id, s in zip(info["ids"], info["settings"], strict=True):
        item = app.studio.gallery.get(item_id)
        assert item.technique == "ip2p" and item.parent_id == upload.id
        assert item.prompt == "make the square blue"
        assert s["image_guidance"] == 1.5 and s["source_id"] == upload.id and s["batch_size"] == 1
    assert "input cropped 70×60 to 64×56 (centre)" in info["notes"]


def _corrupt_png(tmp_path) -> str:
    data = bytearray(_png_bytes((16, 16)))
    data[40:60] = b"\x00" * 20
    path = tmp_path / "corrupt.png"
    path.write_bytes(bytes(data))
    return str(path)


BAD_EDITS = {
    "sdedit without an image": ("/sdedit", None, {}, "no input image"),
    "sdedit of a corrupt file": ("/sdedit", "corrupt", {}, "not a readable image"),
    "sdedit of a text file": ("/sdedit", "text", {}, "not a readable image"),
    "sdedit strength 1.5": ("/sdedit", "good", {"strength": 1.5}, "strength must be between 0.0 and 1.0"),
    "sdedit of a deleted gallery item": ("/sdedit", None, {"source_id": 999_999}, "no longer exists"),
    "ip2p without an image": ("/ip2p", None, {}, "no input image"),
    "ip2p of a corrupt file": ("/ip2p", "corrupt", {}, "not a readable image"),
    "ip2p on a plain SD model": ("/ip2p", "good", {"model": "app"}, "is not an InstructPix2Pix model"),
    "ip2p without an instruction": ("/ip2p", "good", {"instruction": " "}, "instruction is empty"),
}


@pytest.mark.parametrize("case", list(BAD_EDITS))
def test_bad_edit_is_a_clear_error(app, tiny_sd, tiny_ip2p, source_png, tmp_path, case, capfd):
    api_name, image, changes, phrase = BAD_EDITS[case]
    if changes.get("model") == "app":
        changes = {**changes, "model": app.model}  # toy-sd: a 4-channel UNet
    s = sdedit_settings(tiny_sd, **changes) if api_name == "/sdedit" else ip2p_settings(tiny_ip2p, **changes)
    if image == "good":
        image = source_png
    elif image == "corrupt":
        image = _corrupt_png(tmp_path)
    elif image == "text":
        image = str(tmp_path / "notes.png")
        (tmp_path / "notes.png").write_text("not a picture")
    before = app.studio.gallery.count()
    files_before = sorted(p.name for p in app.studio.paths.images.iterdir())
    with pytest.raises(AppError) as caught:
        edit(app, api_name, image, s)
    message = str(caught.value)
    assert phrase in message
    assert "Traceback" not in message and 'File "' not in message
    assert len(message) < 600
    assert app.studio.gallery.count() == before
    assert sorted(p.name for p in app.studio.paths.images.iterdir()) == files_before
    assert server_tracebacks(capfd) == ""


def p2p_settings(app, **changes) -> dict:
    base = {
        "prompt": "a red circle on the left",
        "edit_prompt": "a red square on the left",
        "model": app.model,
        "steps": 4,
        "seed": 6,
    }
    base.update(changes)
    return base


def test_p2p_returns_both_images_and_their_attention_maps(app):
    before = app.studio.gallery.count()
    images, info = app.client.predict(p2p_settings(app, local_blend=["circle", "square"]), api_name="/p2p")
    paths = [entry["image"] for entry in images]
    assert len(paths) == 4  # source, edited, and each prompt's attention sheet
    source, edited = (app.studio.gallery.get(i) for i in info["ids"])
    assert edited.parent_id == source.id and edited.prompt == "a red square on the left"
    assert info["seed"] == 6 and info["settings"]["local_blend"] == ["circle", "square"]
    assert app.studio.gallery.count() == before + 2
    with Image.open(paths[2]) as sheet:
        assert sheet.width == 6 * 128  # one tile per word of "a red circle on the left"


BAD_P2P = {
    "words that can't be aligned": (
        {"edit_prompt": "a big red square on the left"},
        "replace swaps words one for one",
    ),
    "a word not in the prompt": (
        {"reweight": [{"word": "blue", "factor": 2}]},
        "'blue' is not in the edit prompt",
    ),
    "a fraction above 1": ({"cross_replace": 1.2}, "between 0.0 and 1.0"),
    "an unknown mode": ({"mode": "swap"}, "mode must be one of"),
}


@pytest.mark.parametrize("case", list(BAD_P2P))
def test_bad_p2p_is_a_clear_error(app, case, capfd):
    changes, phrase = BAD_P2P[case]
    before = app.studio.gallery.count()
    with pytest.raises(AppError) as caught:
        app.client.predict(p2p_settings(app, **changes), api_name="/p2p")
    message = str(caught.value)
    assert phrase in message and "Traceback" not in message
    assert app.studio.gallery.count() == before
    assert server_tracebacks(capfd) == ""


@pytest.fixture(scope="module")
def square_png(tmp_path_factory) -> str:
    """A white square on black, 64×64: canny draws its outline."""
    path = tmp_path_factory.mktemp("control_input") / "square.png"
    image = Image.new("RGB", (64, 64), (0, 0, 0))
    image.paste((255, 255, 255), (20, 20, 44, 44))
    image.save(path)
    return str(path)


def controlnet_settings(tiny_sd, tiny_controlnet, **unit) -> dict:
    return {
        "prompt": "a white square in the center",
        "model": str(tiny_sd),
        "steps": 3,
        "seed": 2,
        "units": [{"model": str(tiny_controlnet), "preprocessor": "canny", **unit}],
    }


def controlnet(app, files, s: dict):
    images, info = app.client.predict(files, s, api_name="/controlnet")
    return [entry["image"] for entry in images], info


def test_controlnet_stores_the_map_and_the_image_under_it(app, tiny_sd, tiny_controlnet, square_png):
    before = app.studio.gallery.count()
    paths, info = controlnet(app, [handle_file(square_png)], controlnet_settings(tiny_sd, tiny_controlnet))
    assert len(paths) == 2  # the image, then the control map
    assert info["seeds"] == [2] and len(info["ids"]) == 1 and len(info["map_ids"]) == 1
    assert app.studio.gallery.count() == before + 2  # the map and the image
    item = app.studio.gallery.get(info["ids"][0])
    stored_map = app.studio.gallery.get(info["map_ids"][0])
    assert item.technique == "controlnet" and item.parent_id == stored_map.id
    assert stored_map.technique == "control map" and (stored_map.width, stored_map.height) == (64, 64)
    assert info["settings"][0]["units"][0]["map_id"] == stored_map.id
    with Image.open(paths[1]) as returned_map:
        assert returned_map.size == (64, 64)
        assert np.array_equal(np.asarray(returned_map.convert("RGB")), pixels(stored_map.image_path))

    # No file: the stored map named by map_id is used as it is; nothing new is stored but the image.
    again, info2 = controlnet(app, None, {**item.settings, "seed": 3})
    assert info2["map_ids"] == [stored_map.id] and info2["seeds"] == [3]
    assert app.studio.gallery.get(info2["ids"][0]).parent_id == stored_map.id
    assert app.studio.gallery.count() == before + 3


def test_controlnet_unknown_preprocessor_is_a_clear_error(app, tiny_sd, tiny_controlnet, square_png, capfd):
    before = app.studio.gallery.count()
    s = controlnet_settings(tiny_sd, tiny_controlnet, preprocessor="x-ray")
    with pytest.raises(AppError) as caught:
        controlnet(app, [handle_file(square_png)], s)
    message = str(caught.value)
    assert "unknown preprocessor 'x-ray'" in message
    assert "Traceback" not in message and 'File "' not in message
    assert app.studio.gallery.count() == before
    assert server_tracebacks(capfd) == ""


@pytest.fixture(scope="module")
def reference_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("ip") / "reference.png"
    picture = Image.new("RGB", (64, 64), (255, 255, 255))
    picture.paste((40, 90, 220), (20, 20, 44, 44))
    picture.save(path)
    return path


def test_ip_adapter_stores_the_reference_and_the_image_under_it(app, tiny_sd, tiny_ip_adapter, reference_png):
    before = app.studio.gallery.count()
    s = {
        "prompt": PROMPT,
        "model": str(tiny_sd),
        "steps": 3,
        "seed": 2,
        "units": [{"adapter": str(tiny_ip_adapter)}],
    }
    images, info = app.client.predict([handle_file(reference_png)], None, s, api_name="/ip_adapter")
    assert len(images) == 2 and info["seeds"] == [2]  # the image, then the reference
    (reference_id,) = info["reference_ids"][0]
    item = app.studio.gallery.get(info["ids"][0])
    assert item.technique == "ip_adapter" and item.parent_id == reference_id
    assert app.studio.gallery.get(reference_id).technique == "reference"
    assert app.studio.gallery.count() == before + 2
    # Restored settings name the stored reference: no file needed, nothing new stored but the image.
    again, info2 = app.client.predict(None, None, {**item.settings, "seed": 3}, api_name="/ip_adapter")
    assert info2["reference_ids"] == [[reference_id]] and app.studio.gallery.count() == before + 3


@pytest.mark.parametrize(
    "case, phrase",
    [
        ("unknown adapter", "unknown IP-Adapter 'nope'"),
        ("no reference", "but 0 were given"),
        ("instantid without its files", "InstantID needs files that are not on this machine"),
    ],
)
def test_bad_ip_adapter_is_a_clear_error(
    app, tiny_sd, tiny_ip_adapter, reference_png, case, phrase, capfd, tmp_path, monkeypatch
):
    monkeypatch.setenv("LATENT_STUDIO_INSTANTID", str(tmp_path))  # an empty InstantID folder
    before = app.studio.gallery.count()
    with pytest.raises(AppError) as caught:
        if case == "instantid without its files":
            app.client.predict(handle_file(reference_png), {"prompt": "a portrait"}, api_name="/instantid")
        else:
            adapter = "nope" if case == "unknown adapter" else str(tiny_ip_adapter)
            files = [handle_file(reference_png)] if case == "unknown adapter" else None
            s = {"prompt": PROMPT, "model": str(tiny_sd), "steps": 3, "units": [{"adapter": adapter}]}
            app.client.predict(files, None, s, api_name="/ip_adapter")
    message = str(caught.value)
    assert phrase in message and "Traceback" not in message
    assert app.studio.gallery.count() == before
    assert server_tracebacks(capfd) == ""


def evaluation_settings(app, **changes) -> dict:
    base = {
        "metrics": ["clip-score", "fid"],
        "models": [app.model],
        "prompt_set": "custom",
        "prompts": [PROMPT, "a blue square at the top"],
        "values": ["1", "5"],
        "samples": 2,
        "steps": 3,
    }
    base.update(changes)
    return base


def test_evaluate_runs_a_job_and_returns_its_numbers_and_plots(app):
    figures, result = app.client.predict(json.dumps(evaluation_settings(app)), api_name="/evaluate")
    assert set(result["clip-score"][app.model]) == set(result["fid"][app.model]) == {"1", "5"}
    assert all(0 <= v <= 100 for v in result["clip-score"][app.model].values())
    assert result["samples per cell"] == 4
    assert any("biased upward at small N" in note for note in result["notes"])
    assert [entry["caption"] for entry in figures] == [
        "grid",
        "clip-score against guidance",
        "fid against guidance",
    ]
    with Image.open(figures[1]["image"]) as chart:
        assert chart.format == "PNG" and chart.size == (480, 300)
    job = app.studio.jobs.get(result["job_id"])
    assert (job.kind, job.status, job.step, job.total) == ("evaluation", "done", 8, 8)
    stored = app.studio.gallery.evaluation(result["evaluation_id"])
    assert stored.results["clip-score"] == result["clip-score"]
    assert stored.settings["values"] == ["1", "5"]


def test_evaluate_scores_generated_gallery_pictures(app):
    _, info = generate(app, settings(app, seed=21, batch_size=2))
    ids = info["ids"]
    figures, result = app.client.predict(
        {"metrics": ["toy-geneval", "clip-score"], "gallery_ids": ids}, api_name="/evaluate"
    )
    assert result["samples per cell"] == 2 and 0 <= result["toy-geneval"] <= 1
    assert 0 <= result["clip-score"] <= 100
    assert [entry["caption"] for entry in figures] == ["grid"]
    stored = app.studio.gallery.evaluation(result["evaluation_id"])
    assert stored.settings["gallery_ids"] == ids and stored.results["clip-score"] == result["clip-score"]


BAD_EVALUATION = {
    "not JSON": ("{metrics: clip", "the settings are not valid JSON"),
    "an unavailable metric": ({"metrics": ["pickscore"]}, "pickscore needs yuvalkirstain/PickScore_v1"),
    "a value that is no number": ({"values": ["1", "hot"]}, "guidance value 'hot' is not a number"),
    "toy-geneval on custom prompts": ({"metrics": ["toy-geneval"]}, "toy-geneval scores its own prompt set"),
    "an unknown model": ({"models": ["no-such-model"]}, "unknown model 'no-such-model'"),
    "an unknown key": ({"colour": "red"}, "unknown settings: colour"),
    "a gallery id with no picture": ({"gallery_ids": [987654]}, "the gallery has no picture with id 987654"),
}


@pytest.mark.parametrize("case", list(BAD_EVALUATION))
def test_bad_evaluation_is_a_clear_error(app, case, capfd):
    changes, phrase = BAD_EVALUATION[case]
    s = changes if isinstance(changes, str) else json.dumps(evaluation_settings(app, **changes))
    jobs = len(app.studio.jobs.list(limit=100))
    with pytest.raises(AppError) as caught:
        app.client.predict(s, api_name="/evaluate")
    message = str(caught.value)
    assert phrase in message and "Traceback" not in message and len(message) < 600
    assert len(app.studio.jobs.list(limit=100)) == jobs  # refused before a job was queued
    assert server_tracebacks(capfd) == ""


def test_app_still_serves_after_bad_input(app):
    """Runs last: every refused request above left the app working and the gallery as it was."""
    items, total = app.client.predict("", api_name="/gallery_search")
    assert total == app.studio.gallery.count() == len(items)
    # Only test_txt2img_stores_searches_and_remakes (an image and its remake), the two edit
    # tests (uploads and their edits), the P2P test (a source and its edit) and the ControlNet
    # test (a map and its images) and the evaluation test (its plots) stored anything.
    techniques = {"txt2img", "upload", "sdedit", "ip2p", "p2p", "controlnet", "control map", "evaluation"}
    techniques |= {"ip_adapter", "reference"}
    assert {item["technique"] for item in items} <= techniques
    assert all(item["prompt"] == PROMPT for item in items if item["technique"] == "txt2img")
    paths, info = generate(app, settings(app, prompt="a green square", seed=5))
    assert app.studio.gallery.count() == total + 1
    assert info["seeds"] == [5]
