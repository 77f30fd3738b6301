"""Tests for studio.gallery: the SQLite/Alembic image catalogue."""

from __future__ import annotations

import hashlib
import io
import os
import sqlite3
import struct
import subprocess
import sys
import textwrap
import threading
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from studio import gallery as gallery_mod
from studio import pngmeta
from studio.gallery import (
    Gallery,
    GalleryError,
    GalleryItem,
    ImageRejected,
    InvalidValue,
    ItemNotFound,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

A1111_INFOTEXT = (
    "a castle on a hill, sunset,\nhighly detailed\n"
    "Negative prompt: blurry, lowres\n"
    "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 987654321, "
    "Size: 16x12, Model hash: abcdef1234, Model: dreamshaper_8, "
    'Lora hashes: "castle: 0123456789ab, light: ba9876543210", Version: v1.10.1'
)

HOSTILE_QUERIES = [
    '"; DROP TABLE images; --',
    "'; DELETE FROM images WHERE 1=1; --",
    "*",
    "cat*",
    "NEAR(",
    "NEAR(cat dog, 2)",
    'unbalanced "quote',
    '"',
    '""',
    "AND OR NOT",
    "cat AND",
    "prompt:cat",
    "negative_prompt:",
    "^cat",
    "(cat",
    "{prompt negative_prompt}: cat",
    "\\",
    "%_%",
    "\x00",
    "\ud800",
    "猫 🐱",
    "cat " * 500,
    "x" * 5000,
]


def tiny(color=(255, 0, 0), size=(8, 8)) -> Image.Image:
    return Image.new("RGB", size, color)


def add(g: Gallery, prompt: str = "a red cat", **kw) -> GalleryItem:
    fields = {
        "technique": "txt2img",
        "model": "toy-sd",
        "negative_prompt": "blurry",
        "seed": 1,
        "steps": 20,
        "guidance": 7.5,
        "width": 8,
        "height": 8,
        "scheduler": "DDIM",
        "settings": {"prompt": prompt, "seed": kw.get("seed", 1)},
        "infotext": None,
    }
    fields.update(kw)
    return g.add(tiny(), prompt=prompt, **fields)


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != gallery_mod.LOCK_NAME)


@pytest.fixture
def gallery(tmp_path):
    g = Gallery(tmp_path / "db" / "gallery.db", tmp_path / "images")
    yield g
    g.close()


# --- lifecycle / migrations --------------------------------------------------------------------


def test_construction_is_lazy(tmp_path):
    g = Gallery(tmp_path / "g.db", tmp_path / "images")
    assert list(tmp_path.iterdir()) == []
    assert g.count() == 0  # first use opens
    assert (tmp_path / "g.db").exists() and (tmp_path / "images").is_dir()
    g.close()


def test_migration_to_head_and_reopen_is_idempotent(tmp_path):
    db = tmp_path / "g.db"
    g = Gallery(db, tmp_path / "images").open()
    item = add(g, "first")
    g.close()
    for _ in range(2):
        g = Gallery(db, tmp_path / "images").open()
        assert g.count() == 1 and g.get(item.id) == item
        assert g.last_reconcile is not None and not g.last_reconcile.changed
        g.close()
    engine = gallery_mod._make_engine(db)
    gallery_mod.upgrade_database(engine)  # running it again changes nothing
    engine.dispose()
    con = sqlite3.connect(db)
    try:
        assert con.execute("SELECT version_num FROM alembic_version").fetchall() == [("0003",)]
        names = {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
        assert {
            "evaluations",
            "jobs",
            "images",
            "image_tags",
            "images_fts",
            "images_fts_ai",
            "images_fts_ad",
            "images_fts_au",
        } <= names
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        con.close()


# --- add / get ---------------------------------------------------------------------------------


def test_add_and_get(gallery):
    item = add(
        gallery,
        "a red cat, on a mat",
        seed=2**40,
        tags=["cats", "red", "cats", " spaced  tag "],
        duration_s=1.25,
        settings={"technique": "txt2img", "nested": {"list": [1, 2]}},
    )
    assert isinstance(item.id, int)
    assert item.created_at.tzinfo is not None and item.created_at.utcoffset() == timedelta(0)
    assert item.tags == ("cats", "red", "spaced tag")
    assert item.favourite is False and item.parent_id is None and item.duration_s == 1.25
    assert item.settings == {"technique": "txt2img", "nested": {"list": [1, 2]}}
    assert gallery.get(item.id) == item
    assert gallery.get(10_000) is None

    path = Path(item.image_path)
    assert path.parent == gallery.image_dir and path.suffix == ".png"
    assert "cat" not in path.name  # never derived from user text
    assert hashlib.sha256(path.read_bytes()).hexdigest() == item.sha256
    meta = pngmeta.read_png(path)
    assert meta.settings == item.settings
    parsed = pngmeta.parse_infotext(meta.infotext)
    assert parsed["prompt"] == "a red cat, on a mat" and parsed["Seed"] == 2**40
    assert files_in(gallery.image_dir) == [path.name]


def test_add_uses_given_infotext(gallery):
    item = add(gallery, "x", infotext="custom\nSteps: 1, Seed: 2, Size: 8x8")
    assert pngmeta.read_png(item.image_path).infotext == "custom\nSteps: 1, Seed: 2, Size: 8x8"


@pytest.mark.parametrize(
    "kw",
    [
        {"seed": "12"},
        {"seed": 2**64},
        {"seed": True},
        {"steps": -1},
        {"guidance": float("nan")},
        {"width": 0},
        {"technique": ""},
        {"model": None},
        {"settings": {"bad": object()}},
        {"settings": {"nan": float("inf")}},
        {"settings": "not a dict"},
        {"tags": "notalist"},
        {"tags": ["x" * 100]},
        {"tags": [f"t{i}" for i in range(40)]},
        {"prompt": "p" * 20_000},
        {"parent_id": 999},
        {"parent_id": "1"},
    ],
)
def test_add_rejects_bad_input_and_stores_nothing(gallery, kw):
    with pytest.raises(GalleryError) as info:
        add(gallery, **kw)
    assert isinstance(info.value, ValueError) and str(info.value).endswith(".")
    assert gallery.count() == 0
    assert files_in(gallery.image_dir) == []


def test_add_rejects_non_image(gallery):
    with pytest.raises(InvalidValue):
        gallery.add(b"png bytes", technique="t", model="m", prompt="p")


# --- search ------------------------------------------------------------------------------------


@pytest.fixture
def filled(gallery):
    base = datetime.now(UTC)
    items = [
        add(gallery, "a red cat on a mat", model="sd15", technique="txt2img"),
        add(gallery, "a blue dog in the park", model="sd15", technique="img2img", negative_prompt="cat"),
        add(gallery, "Crème brûlée, café", model="sdxl", technique="txt2img"),
        add(gallery, "a green cat; sleeping", model="sdxl", technique="inpaint"),
        add(gallery, "mountains at dawn", model="sd15", technique="txt2img"),
    ]
    return gallery, items, base


def ids(page):
    return [i.id for i in page.items]


def test_search_words_newest_first(filled):
    g, items, _ = filled
    everything = g.search()
    assert everything.total == 5
    assert ids(everything) == [i.id for i in reversed(items)]
    assert ids(g.search("cat")) == [items[3].id, items[1].id, items[0].id]  # prompt or negative
    assert ids(g.search("CAT mat")) == [items[0].id]  # all words, case-insensitive
    assert ids(g.search("creme brulee")) == [items[2].id]  # diacritics folded
    assert g.search("zebra").total == 0
    assert g.search("   ").total == 5


def test_search_filters_and_paging(filled):
    g, items, base = filled
    assert ids(g.search(model="sdxl")) == [items[3].id, items[2].id]
    assert ids(g.search("cat", model="sd15")) == [items[1].id, items[0].id]
    assert ids(g.search(technique="img2img")) == [items[1].id]
    g.set_favourite(items[4].id, True)
    g.set_favourite(items[0].id, True)
    assert ids(g.search(favourite=True)) == [items[4].id, items[0].id]
    assert g.search(favourite=False).total == 3
    assert g.search(since=base - timedelta(minutes=1)).total == 5
    assert g.search(since=datetime.now(UTC) + timedelta(minutes=1)).total == 0
    assert g.search(until=items[2].created_at).total == 2
    assert g.search(since=items[2].created_at.replace(tzinfo=None)).total == 3  # naive = UTC

    pages = [g.search(page=p, page_size=2) for p in range(4)]
    assert [len(p.items) for p in pages] == [2, 2, 1, 0]
    assert all(p.total == 5 and p.pages == 3 for p in pages)
    assert sum((ids(p) for p in pages), []) == [i.id for i in reversed(items)]

    with pytest.raises(InvalidValue):
        g.search(page=-1)
    with pytest.raises(InvalidValue):
        g.search(page_size=0)
    with pytest.raises(InvalidValue):
        g.search(since="yesterday")
    with pytest.raises(InvalidValue):
        g.search(favourite="yes")


def test_search_many_matches_path(filled, monkeypatch):
    g, items, _ = filled
    monkeypatch.setattr(gallery_mod, "_FTS_SCAN_THRESHOLD", 0)  # use the index-scan plan
    assert ids(g.search("cat")) == [items[3].id, items[1].id, items[0].id]
    assert ids(g.search("cat", model="sd15")) == [items[1].id, items[0].id]
    second = g.search("a", page=1, page_size=2)  # "a" is in items 0, 1 and 3
    assert ids(second) == [items[0].id] and second.total == 3


def test_empty_gallery(gallery):
    assert gallery.search().total == 0 and gallery.search("cat").items == ()
    assert gallery.models() == [] and gallery.techniques() == [] and gallery.count() == 0


@pytest.mark.parametrize("query", HOSTILE_QUERIES)
def test_search_hostile_queries_never_raise(filled, query):
    g, items, _ = filled
    page = g.search(query)
    assert 0 <= page.total <= len(items)
    assert g.count() == len(items)
    assert g.search().total == len(items)


def test_search_sql_looking_words_match_as_words(gallery):
    add(gallery, "drop table near cats")
    add(gallery, "a dog")
    assert gallery.search('"; DROP TABLE').total == 1
    assert gallery.search("NEAR( cats").total == 1
    assert gallery.search("cats*").total == 1  # '*' is just a character inside the phrase
    assert gallery.count() == 2


# --- favourite / tags / models -----------------------------------------------------------------


def test_favourite_tags_models(filled):
    g, items, _ = filled
    assert g.set_favourite(items[0].id, True).favourite is True
    assert g.get(items[0].id).favourite is True
    assert g.set_favourite(items[0].id, False).favourite is False
    assert g.set_tags(items[1].id, ["b", "a", "a"]).tags == ("a", "b")
    assert g.search(tag="a").total == 1
    assert g.set_tags(items[1].id, []).tags == ()
    assert g.models() == ["sd15", "sdxl"]
    assert g.techniques() == ["img2img", "inpaint", "txt2img"]
    with pytest.raises(ItemNotFound):
        g.set_favourite(12345, True)
    with pytest.raises(ItemNotFound):
        g.set_tags(12345, ["x"])
    with pytest.raises(InvalidValue):
        g.set_favourite(items[0].id, "yes")


# --- delete / lineage --------------------------------------------------------------------------


def test_delete_removes_row_and_file_children_survive(gallery):
    parent = add(gallery, "parent cat")
    child = add(gallery, "child cat", parent_id=parent.id, tags=["x"])
    gallery.delete(parent.id)
    assert gallery.get(parent.id) is None
    assert not Path(parent.image_path).exists()
    assert gallery.get(child.id).parent_id is None
    assert ids(gallery.search("cat")) == [child.id]  # FTS kept in sync
    assert files_in(gallery.image_dir) == [Path(child.image_path).name]
    with pytest.raises(ItemNotFound):
        gallery.delete(parent.id)
    gallery.delete(child.id)
    assert gallery.count() == 0 and files_in(gallery.image_dir) == []


def test_delete_rolls_back_if_commit_fails(gallery, monkeypatch):
    item = add(gallery)

    def failing_commit(transaction):
        raise RuntimeError("commit failed")

    monkeypatch.setattr(Gallery, "_commit", staticmethod(failing_commit))
    with pytest.raises(RuntimeError):
        gallery.delete(item.id)
    monkeypatch.undo()
    assert gallery.get(item.id) == item and Path(item.image_path).exists()


def test_lineage(gallery):
    a = add(gallery, "a")
    b = add(gallery, "b", parent_id=a.id)
    c = add(gallery, "c", parent_id=b.id)
    d = add(gallery, "d", parent_id=b.id)
    ancestors, children = gallery.lineage(c.id)
    assert [i.id for i in ancestors] == [a.id, b.id] and children == []
    ancestors, children = gallery.lineage(b.id)
    assert [i.id for i in ancestors] == [a.id] and [i.id for i in children] == [c.id, d.id]
    assert gallery.lineage(a.id)[0] == []
    with pytest.raises(ItemNotFound):
        gallery.lineage(999)


# --- crash safety ------------------------------------------------------------------------------


def test_failed_commit_leaves_nothing(gallery, monkeypatch):
    add(gallery, "kept")

    def failing_commit(transaction):
        raise RuntimeError("simulated commit failure")

    monkeypatch.setattr(Gallery, "_commit", staticmethod(failing_commit))
    with pytest.raises(RuntimeError):
        add(gallery, "lost")
    monkeypatch.undo()
    assert gallery.count() == 1
    assert len(files_in(gallery.image_dir)) == 1
    assert not gallery.reconcile().changed


def test_failed_rename_leaves_nothing(gallery, monkeypatch):
    add(gallery, "kept")
    real_replace = os.replace

    def failing_final_rename(src, dst):
        if not os.path.basename(dst).startswith(gallery_mod.TEMP_PREFIX):
            raise OSError("simulated rename failure")
        real_replace(src, dst)

    monkeypatch.setattr(gallery_mod.os, "replace", failing_final_rename)
    with pytest.raises(OSError):
        add(gallery, "lost")
    monkeypatch.undo()
    assert gallery.count() == 1 and len(files_in(gallery.image_dir)) == 1
    assert gallery.search("lost").total == 0


def test_reconcile_cleans_leftovers(gallery):
    keep = add(gallery, "keep")
    gone = add(gallery, "gone")
    Path(gone.image_path).unlink()  # row whose file vanished
    (gallery.image_dir / ".tmp-20250101-000000-abc.png").write_bytes(b"partial")
    (gallery.image_dir / ".tmp-xyz.part").write_bytes(b"partial")
    orphan = gallery.image_dir / "20250101-000000-deadbeef.png"
    orphan.write_bytes(b"no row")
    (gallery.image_dir / "notes.txt").write_text("not ours")
    report = gallery.reconcile()
    assert (report.temp_files_removed, report.orphan_files_removed, report.missing_rows_removed) == (2, 1, 1)
    assert gallery.get(gone.id) is None and gallery.get(keep.id) == keep
    assert files_in(gallery.image_dir) == sorted([Path(keep.image_path).name, "notes.txt"])
    assert not gallery.reconcile().changed


def test_reconcile_keeps_rows_when_folder_looks_wrong(gallery):
    rows = [
        {
            "technique": "txt2img",
            "model": "m",
            "prompt": f"p{i}",
            "negative_prompt": "",
            "width": 8,
            "height": 8,
            "settings": "{}",
            "image_path": f"missing-{i}.png",
            "sha256": "0" * 64,
            "duration_s": 0.0,
            "created_at": i,
            "favourite": False,
        }
        for i in range(12)
    ]
    gallery._bulk_insert_rows(rows)
    report = gallery.reconcile()
    assert report.missing_rows_kept == 12 and report.missing_rows_removed == 0
    assert gallery.count() == 12


CRASH_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from PIL import Image
    import studio.gallery as G

    db, images, stage = sys.argv[1:4]
    g = G.Gallery(db, images).open()
    g.add(Image.new("RGB", (8, 8)), technique="txt2img", model="m", prompt="committed")
    if stage == "after_staging":
        real_write = G.pngmeta.write_png

        def write_then_die(*args, **kwargs):
            real_write(*args, **kwargs)
            os._exit(3)

        G.pngmeta.write_png = write_then_die
    elif stage == "after_rename":
        real_replace = os.replace

        def rename_then_die(src, dst):
            real_replace(src, dst)
            if not os.path.basename(dst).startswith(G.TEMP_PREFIX):
                os._exit(3)

        G.os.replace = rename_then_die
    g.add(Image.new("RGB", (8, 8)), technique="txt2img", model="m", prompt="crashed")
    os._exit(0)
    """
)


@pytest.mark.parametrize("stage", ["after_staging", "after_rename"])
def test_real_crash_mid_add_leaves_no_orphans(tmp_path, stage):
    db, images = tmp_path / "g.db", tmp_path / "images"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, str(db), str(images), stage],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3, proc.stderr
    leftovers = files_in(images)
    assert len(leftovers) == 2  # the committed image plus the crashed one's file
    g = Gallery(db, images)
    try:
        g.open()  # reconciles
        report = g.last_reconcile
        assert report.temp_files_removed + report.orphan_files_removed == 1
        assert g.count() == 1 and g.search("crashed").total == 0
        (item,) = g.search().items
        assert files_in(images) == [Path(item.image_path).name]
        assert not g.reconcile().changed
    finally:
        g.close()


# --- concurrency -------------------------------------------------------------------------------


def test_concurrent_adds_from_four_threads(gallery):
    gallery.open()
    errors: list[BaseException] = []
    results: list[GalleryItem] = []
    lock = threading.Lock()

    def worker(n):
        try:
            for k in range(5):
                item = add(gallery, f"thread {n} image {k}", seed=n * 100 + k)
                gallery.search("thread")
                with lock:
                    results.append(item)
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len({i.id for i in results}) == 20
    assert gallery.count() == 20 and gallery.search("thread").total == 20
    assert len(files_in(gallery.image_dir)) == 20


# --- import ------------------------------------------------------------------------------------


def write_png_with_text(path: Path, size=(16, 12), **text: str) -> Path:
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    Image.new("RGB", size, (10, 200, 30)).save(path, format="PNG", pnginfo=info)
    return path


def test_import_a1111_png(gallery, tmp_path):
    src = write_png_with_text(tmp_path / "a1111.png", parameters=A1111_INFOTEXT)
    item = gallery.import_png(src)
    assert item.technique == "import"
    assert item.prompt == "a castle on a hill, sunset,\nhighly detailed"
    assert item.negative_prompt == "blurry, lowres"
    assert (item.seed, item.steps, item.guidance) == (987654321, 30, 6.5)
    assert (item.width, item.height) == (16, 12)
    assert item.scheduler == "DPM++ 2M" and item.model == "dreamshaper_8"
    assert item.settings == {
        "technique": "txt2img",
        "prompt": item.prompt,
        "negative_prompt": "blurry, lowres",
        "seed": 987654321,
        "steps": 30,
        "guidance": 6.5,
        "width": 16,
        "height": 12,
        "scheduler": "DPM++ 2M",
        "model": "dreamshaper_8",
    }
    meta = pngmeta.read_png(item.image_path)
    assert meta.infotext == A1111_INFOTEXT  # the original infotext is kept
    assert Path(item.image_path) != src and gallery.search("castle").total == 1


def test_import_our_png_round_trip(gallery, tmp_path):
    original = add(
        gallery,
        "an owl",
        technique="img2img",
        settings={"technique": "img2img", "strength": 0.6, "prompt": "an owl", "seed": 5},
        seed=5,
    )
    other = Gallery(tmp_path / "other.db", tmp_path / "other")
    try:
        item = other.import_png(original.image_path)
        assert item.technique == "img2img"
        assert item.settings == original.settings
        assert (item.prompt, item.seed, item.model) == ("an owl", 5, "toy-sd")
    finally:
        other.close()


def _bomb_bytes() -> bytes:
    buffer = io.BytesIO()
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", A1111_INFOTEXT)
    Image.new("RGB", (4, 4)).save(buffer, format="PNG", pnginfo=info)
    data = bytearray(buffer.getvalue())
    struct.pack_into(">II", data, 16, 100_000, 100_000)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _with_chunk(kind: bytes, payload: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG")
    data = buffer.getvalue()
    chunk = struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    at = data.index(b"IDAT") - 4
    return data[:at] + chunk + data[at:]


@pytest.mark.parametrize(
    "make",
    [
        lambda p: p.write_bytes(_bomb_bytes()),
        lambda p: p.write_text("definitely not a png"),
        lambda p: write_png_with_text(p),  # no metadata at all
        lambda p: write_png_with_text(p, parameters="x\nSteps: 10, Seed: 1" + "9" * 40 + ", Size: 8x8"),
        lambda p: write_png_with_text(p, latent_studio='{"seed": "abc", "prompt": "x"}'),
        lambda p: write_png_with_text(p, latent_studio='{"technique": "txt2img", "steps": -5}'),
        lambda p: p.write_bytes(_with_chunk(b"iTXt", b"parameters\x00\x00\x00\x00\x00\xed\xa0\x80 \xff")),
        lambda p: p.write_bytes(
            _with_chunk(b"zTXt", b"parameters\x00\x00" + zlib.compress(b"a" * 5_000_000))
        ),
        lambda p: p.write_bytes(_bomb_bytes()[:-20]),
    ],
)
def test_import_hostile_files_store_nothing(gallery, tmp_path, make):
    path = tmp_path / "hostile.png"
    make(path)
    with pytest.raises(ImageRejected) as info:
        gallery.import_png(path)
    assert isinstance(info.value, ValueError) and str(info.value)
    assert gallery.count() == 0 and files_in(gallery.image_dir) == []


def test_import_missing_file(gallery, tmp_path):
    with pytest.raises(ImageRejected):
        gallery.import_png(tmp_path / "nope.png")


def test_a_gallery_of_the_first_schema_upgrades_and_keeps_its_images(tmp_path):
    """A database of revision 0001 (before evaluations) opens, gains the table, loses nothing."""
    from alembic import command
    from alembic.config import Config

    db = tmp_path / "g.db"
    g = Gallery(db, tmp_path / "images").open()
    item = add(g, "kept across the upgrade")
    g.close()
    engine = gallery_mod._make_engine(db)
    config = Config()
    config.set_main_option("script_location", str(gallery_mod.MIGRATIONS_DIR))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0001")
    engine.dispose()
    con = sqlite3.connect(db)
    assert "evaluations" not in {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
    con.close()
    g = Gallery(db, tmp_path / "images").open()
    assert g.get(item.id) == item
    run = g.add_evaluation({"technique": "evaluate"}, {"fid": 1.5}, [item.id], 2.0)
    assert g.evaluations() == [run]
    g.close()
