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
