"""The Gallery tab, launched alone and driven through gradio_client (no model needed)."""

from __future__ import annotations

import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import gradio as gr
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from studio import pngmeta
from studio.service import Paths, Studio
from tabs import gallery as gallery_tab
from tabs.common import bus_message, make_bus, once_per_message, tab_switch
from tabs.launch import launch_options

REPO_ROOT = Path(__file__).resolve().parents[1]
API_NAMES = {"/gallery_search", "/gallery_item", "/gallery_delete", "/gallery_favourite", "/gallery_import"}

SEED_IMAGES = [
    # prompt, model, technique, colour
    ("a red apple on a wooden table", "toy-sd", "txt2img", (200, 20, 20)),
    ("a blue cube in the snow", "toy-sd", "txt2img", (20, 20, 200)),
    ("a red cube on grass", "toy-edit", "sdedit", (180, 40, 40)),
    ("a green ball near a tree", "toy-sd", "txt2img", (20, 180, 20)),
    ("a yellow star over the sea", "toy-sd", "controlnet", (220, 220, 20)),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _add(
    studio: Studio, prompt: str, model: str = "toy-sd", technique: str = "txt2img", colour=(9, 9, 9), **kw
):
    settings = {"technique": technique, "prompt": prompt, "model": model, "seed": 7, "steps": 4}
    return studio.gallery.add(
        Image.new("RGB", (8, 8), colour),
        technique=technique,
        model=model,
        prompt=prompt,
        seed=7,
        steps=4,
        guidance=3.5,
        settings=settings,
        **kw,
    )


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gallery_tab")
    studio = Studio(Paths(db=tmp / "g.db", images=tmp / "images"))
    ids = []
    for prompt, model, technique, colour in SEED_IMAGES:
        parent = ids[0] if technique == "sdedit" else None
        ids.append(_add(studio, prompt, model, technique, colour, parent_id=parent).id)
    with gr.Blocks() as demo:
        bus = make_bus()
        tab = gallery_tab.build(studio, bus)
    port = _free_port()
    demo.launch(
        prevent_thread_lock=True,
        server_name="127.0.0.1",
        server_port=port,
        quiet=True,
        **launch_options(studio),
    )
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        yield {"studio": studio, "client": client, "ids": ids, "tab": tab, "tmp": tmp}
    finally:
        demo.close()
        studio.close()


def _search(client: Client, query: str = "", **kw):
    args = {
        "query": query,
        "model": "",
        "technique": "",
        "favourite_only": False,
        "since": "",
        "until": "",
        "page": 1,
    } | kw
    items, total = client.predict(**args, api_name="/gallery_search")
    return items, total


def test_api_names_and_build_result(env):
    endpoints = env["client"].view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert API_NAMES <= set(endpoints)
    search_params = [p["parameter_name"] for p in endpoints["/gallery_search"]["parameters"]]
    assert search_params[:7] == ["query", "model", "technique", "favourite_only", "since", "until", "page"]
    tab = env["tab"]
    assert isinstance(tab, gallery_tab.GalleryTab)
    assert callable(tab.tab_refresh_fn) and tab.tab_refresh_outputs and tab.refresh_button is not None


def test_word_search_returns_items(env):
    items, total = _search(env["client"], "red")
    assert total == 2
    assert {i["prompt"] for i in items} == {"a red apple on a wooden table", "a red cube on grass"}
    item = items[0]
    assert set(item) >= {
        "id",
        "prompt",
        "model",
        "technique",
        "seed",
        "created_at",
        "image_path",
        "favourite",
    }
    assert Path(item["image_path"]).is_file()
    assert datetime.fromisoformat(item["created_at"]).tzinfo is not None
    assert _search(env["client"], "apple table")[1] == 1
    assert _search(env["client"], "nothing-like-this")[1] == 0


def test_filters(env):
    client = env["client"]
    assert _search(client, "", model="toy-edit")[1] == 1
    assert _search(client, "red", model="toy-sd")[1] == 1
    items, total = _search(client, "", technique="controlnet")
    assert total == 1 and items[0]["prompt"] == "a yellow star over the sea"
    today = datetime.now(UTC).date()
    everything = env["studio"].gallery.count()
    assert _search(client, "", since=today.isoformat(), until=today.isoformat())[1] == everything
    assert _search(client, "", until=(today - timedelta(days=1)).isoformat())[1] == 0
    assert _search(client, "", since=(today + timedelta(days=1)).isoformat())[1] == 0


@pytest.mark.parametrize("bad", ["yesterday", "2024-13-01", "2024-02-30", "24-1-1", "2024-01-01T00:00"])
def test_bad_date_is_a_clear_error(env, bad):
    with pytest.raises(AppError, match="YYYY-MM-DD"):
        _search(env["client"], "", since=bad)


def test_paging(env):
    client = env["client"]
    total = env["studio"].gallery.count()
    seen = []
    for page in range(1, 5):
        items, page_total = _search(client, "", page=page, page_size=2)
        assert page_total == total
        seen.extend(i["id"] for i in items)
    assert len(seen) == len(set(seen)) == total
    assert _search(client, "", page=99, page_size=2) == ([], total)
    with pytest.raises(AppError, match="page number"):
        _search(client, "", page=0)


@pytest.mark.parametrize(
    "hostile",
    [
        "'; DROP TABLE images; --",
        '"; DELETE FROM images; --',
        "NEAR(red cube, 2)",
        "*",
        'red" OR "1"="1',
        "\\",
    ],
)
def test_sql_looking_searches_are_harmless(env, hostile):
    before = env["studio"].gallery.count()
    items, total = _search(env["client"], hostile)
    assert isinstance(items, list) and isinstance(total, int)
    assert env["studio"].gallery.count() == before
    assert _search(env["client"], "")[1] == before


def test_item_details(env):
    first = env["ids"][0]
    details = env["client"].predict(first, api_name="/gallery_item")
    assert details["id"] == first
    assert details["settings"]["prompt"] == "a red apple on a wooden table"
    assert details["model"] == "toy-sd" and details["seed"] == 7
    assert len(details["sha256"]) == 64
    with pytest.raises(AppError, match="no image with id 999999"):
        env["client"].predict(999999, api_name="/gallery_item")


def test_favourite(env):
    client = env["client"]
    item = _add(env["studio"], "a purple kite above hills")
    summary = client.predict(item.id, True, api_name="/gallery_favourite")
    assert summary["id"] == item.id and summary["favourite"] is True
    items, total = _search(client, "kite", favourite_only=True)
    assert total == 1 and items[0]["favourite"] is True
    client.predict(item.id, False, api_name="/gallery_favourite")
    assert _search(client, "kite", favourite_only=True)[1] == 0
    assert env["studio"].gallery.get(item.id).favourite is False


def test_delete_removes_row_and_file(env):
    client = env["client"]
    item = _add(env["studio"], "an orange boat to delete")
    path = Path(item.image_path)
    assert path.is_file()
    before = env["studio"].gallery.count()
    result = client.predict(item.id, api_name="/gallery_delete")
    assert result == {"deleted": item.id, "total": before - 1}
    assert not path.exists()
    assert env["studio"].gallery.get(item.id) is None
    with pytest.raises(AppError, match="no image with id"):
        client.predict(item.id, api_name="/gallery_delete")


def test_import_png(env):
    tmp = env["tmp"]
    settings = {"technique": "txt2img", "prompt": "an imported lighthouse", "model": "toy-sd", "seed": 42}
    infotext = pngmeta.format_infotext(
        "an imported lighthouse", "", {"Steps": 5, "Seed": 42, "Model": "toy-sd"}
    )
    source = tmp / "upload.png"
    pngmeta.write_png(source, Image.new("RGB", (8, 8), (0, 120, 200)), infotext, settings)
    summary = env["client"].predict(handle_file(str(source)), api_name="/gallery_import")
    assert summary["prompt"] == "an imported lighthouse" and summary["seed"] == 42
    assert Path(summary["image_path"]).is_file()
    items, total = _search(env["client"], "lighthouse")
    assert total == 1 and items[0]["id"] == summary["id"]


def test_import_rejects_hostile_files(env):
    tmp = env["tmp"]
    before = env["studio"].gallery.count()
    files_before = sorted(p.name for p in env["studio"].paths.images.iterdir())
    fake = tmp / "fake.png"
    fake.write_bytes(b"#!/bin/sh\necho not an image\n")
    with pytest.raises(AppError, match="not a readable image"):
        env["client"].predict(handle_file(str(fake)), api_name="/gallery_import")
    plain = tmp / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)  # a real PNG without generation parameters
    with pytest.raises(AppError, match="no generation parameters"):
        env["client"].predict(handle_file(str(plain)), api_name="/gallery_import")
    text = tmp / "notes.txt"
    text.write_text("hello")
    with pytest.raises(AppError):
        env["client"].predict(handle_file(str(text)), api_name="/gallery_import")
    assert env["studio"].gallery.count() == before
    assert sorted(p.name for p in env["studio"].paths.images.iterdir()) == files_before


def test_restore_and_send_messages(env):
    actions = env["tab"].actions
    first, _, edited, _, controlnet = env["ids"]
    msg = actions.restore_message(first)
    assert msg["target"] == "txt2img" and msg["image_id"] == first
    assert msg["settings"]["prompt"] == "a red apple on a wooden table"
    assert actions.restore_message(edited)["target"] == "editing"
    assert actions.restore_message(controlnet)["target"] == "controlnet"
    sent = actions.send_message(first, "ip_adapter")
    assert sent["target"] == "ip_adapter" and sent["settings"] is None and sent["image_id"] == first
    ancestors, children = env["studio"].gallery.lineage(first)
    assert ancestors == [] and [c.id for c in children] == [edited]
    with pytest.raises(gr.Error, match="no image with id"):
        actions.restore_message(987654)


def test_module_imports_no_torch():
    code = "import sys, tabs.gallery; bad = {'torch', 'diffusers'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=60)


def test_a_send_to_switches_tabs_once_even_when_its_change_event_comes_twice():
    switch = once_per_message(tab_switch, ["tabs"], "routed")
    message = bus_message("evaluation", image_id=7)
    first = switch(message, None)
    assert first["tabs"].selected == "evaluation" and first["routed"] == message["nonce"]
    # the user picks another tab, then the same message's change event arrives again
    assert switch(message, first["routed"]) == gr.skip()
    # a new message (even to the same tab) switches again; no message switches nothing
    again = switch(bus_message("evaluation", image_id=7), first["routed"])
    assert again["tabs"].selected == "evaluation" and again["routed"] == message["nonce"] + 1
    assert switch(None, again["routed"]) == gr.skip()
    assert switch(bus_message(None), again["routed"]) == {"routed": message["nonce"] + 2}


def test_a_tab_fills_its_form_once_per_message_so_an_edit_made_meanwhile_stays():
    def from_bus(message, known):
        if message["target"] != "txt2img":
            return gr.skip()
        return {"prompt": message["settings"]["prompt"], "known": known}

    fill = once_per_message(from_bus, ["prompt", "known"], "seen")
    message = bus_message("txt2img", {"prompt": "a red circle"})
    filled = fill(message, None, "typed")
    assert filled == {"prompt": "a red circle", "known": "typed", "seen": message["nonce"]}
    assert fill(message, filled["seen"], "typed") == gr.skip()  # the doubled event: the edit stays
    other = bus_message("gallery")
    assert fill(other, filled["seen"], "typed") == {"seen": other["nonce"]}
    # values in the outputs' order work as well as a dict
    listed = once_per_message(lambda m: ["a", "b"], ["prompt", "known"], "seen")
    assert listed(bus_message("txt2img"), None) == {"prompt": "a", "known": "b", "seen": message["nonce"] + 2}
