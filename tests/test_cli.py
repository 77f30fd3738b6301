"""`python -m studio`: single and batch txt2img, the gallery, and one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "studio", *map(str, args)], capture_output=True, text=True, cwd=cwd
    )


def test_single_image_is_written_and_stored(tiny_sd, tmp_path):
    from studio.gallery import Gallery
    from studio.pngmeta import read_png

    out = tmp_path / "x.png"
    r = cli(
        "txt2img",
        "--model",
        tiny_sd,
        "--prompt",
        "a red circle",
        "--seed",
        9,
        "--steps",
        3,
        "--out",
        out,  # native size
        "--data-dir",
        tmp_path / "data",
    )
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (64, 64)
    assert read_png(out).settings["seed"] == 9
    with Gallery(tmp_path / "data" / "gallery.db", tmp_path / "data" / "images") as g:
        assert g.count() == 1 and g.search("circle").items[0].seed == 9


def test_batch_from_prompts_file_writes_numbered_images_in_order(tiny_sd, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n\n  \na blue square\na green triangle\n")
    out = tmp_path / "outs"
    r = cli(
        "txt2img",
        "--model",
        tiny_sd,
        "--prompts-file",
        prompts,
        "--steps",
        2,
        "--seed",
        1,
        "--out-dir",
        out,
        "--no-gallery",
        "--data-dir",
        tmp_path / "data",
    )
    assert r.returncode == 0, r.stderr
    from studio.pngmeta import read_png

    files = sorted(p.name for p in out.iterdir())
    assert files == ["0000.png", "0001.png", "0002.png"]
    assert [read_png(out / f).settings["prompt"] for f in files] == [
        "a red circle",
        "a blue square",
        "a green triangle",
    ]
    assert not (tmp_path / "data" / "gallery.db").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", ""], "prompt is empty"),
        (["--prompt", "x", "--width", "7"], "width"),
        (["--prompt", "x", "--steps", "-1"], "steps"),
        (["--prompt", "x", "--guidance", "nan"], "finite"),
        (["--prompt", "x", "--scheduler", "Nope"], "unknown scheduler"),
        (["--prompt", "x", "--model", "weights.ckpt"], "pickle"),
        (["--prompt", "x", "--model", "nonexistent-model"], "unknown model"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    r = cli("txt2img", "--out", tmp_path / "o.png", "--data-dir", tmp_path / "d", *args)
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o.png").exists()


def test_sdedit_and_ip2p_write_the_edit_and_store_it_under_its_input(tiny_sd, tiny_ip2p, tmp_path):
    from studio.gallery import Gallery
    from studio.pngmeta import read_png

    source = tmp_path / "in.png"
    Image.new("RGB", (70, 64), (255, 255, 255)).save(source)
    data = tmp_path / "data"
    r = cli(
        "sdedit", "--model", tiny_sd, "--image", source, "--prompt", "a red circle", "--strength", 0.5,
        "--steps", 4, "--seed", 1, "--out", tmp_path / "e.png", "--data-dir", data,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "cropped 70×64 to 64×64" in r.stderr and "2 of 4 steps run" in r.stderr
    assert read_png(tmp_path / "e.png").settings["strength"] == 0.5
    r = cli(
        "ip2p", "--model", tiny_ip2p, "--image", source, "--instruction", "make the circle red",
        "--steps", 2, "--image-guidance", 1.2, "--out", tmp_path / "p.png", "--data-dir", data,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert read_png(tmp_path / "p.png").settings["image_guidance"] == 1.2
    with Gallery(data / "gallery.db", data / "images") as g:
        techniques = sorted(i.technique for i in g.search("").items)
        assert techniques == ["ip2p", "sdedit", "upload", "upload"]
        for item in g.search("").items:
            if item.technique != "upload":
                assert g.get(item.parent_id).technique == "upload"


@pytest.mark.parametrize(
    "args, message",
    [
        (["sdedit", "--image", "MISSING", "--prompt", "x"], "can't read the input image"),
        (["sdedit", "--image", "IMG", "--prompt", "x", "--strength", "1.5"], "strength must be between"),
        (["sdedit", "--image", "BAD", "--prompt", "x"], "not a readable image"),
        (["ip2p", "--image", "IMG", "--instruction", "x", "--model", "SD"], "not an InstructPix2Pix model"),
    ],
)
def test_edit_errors_are_one_line_and_store_nothing(tiny_sd, tmp_path, args, message):
    Image.new("RGB", (64, 64)).save(tmp_path / "img.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    names = {"IMG": "img.png", "BAD": "bad.png", "MISSING": "missing.png"}
    args = [tmp_path / names[a] if a in names else tiny_sd if a == "SD" else a for a in args]
    r = cli(*args, "--out", tmp_path / "o.png", "--data-dir", tmp_path / "data")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and message in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o.png").exists()
    images = tmp_path / "data" / "images"
    assert not images.exists() or not any(images.iterdir())
