"""End-to-end helpers: the full Latent Studio app launched on a free port, and the model to use.

`pick_model(request)` returns the trained toy model's catalog name (`toy-sd`) once its
folder holds a pipeline, else the path of the session's tiny random model (`tiny_sd`
fixture). `serve(tmp, model)` launches `app.build_app` exactly as `python app.py` does
(one queue lane, the same launch options) and yields `(url, studio)`.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOY_SD = ROOT / "assets" / "models" / "toy-sd"
TOY_SD_NAME = "toy-sd"


def toy_sd_ready() -> bool:
    """The trained model is usable once its folder holds a saved pipeline (index and weights)."""
    return (TOY_SD / "model_index.json").is_file() and any(TOY_SD.glob("unet/*.safetensors"))


def pick_model(request) -> str:
    """`toy-sd` when it has been trained, else the tiny random pipeline's folder."""
    if toy_sd_ready():
        return TOY_SD_NAME
    return str(request.getfixturevalue("tiny_sd"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve(tmp: Path, model: str) -> Iterator[tuple[str, object]]:
    """Launch the whole app on a temporary gallery; yields (url, studio); closes it all after."""
    from app import build_app
    from studio.models import ModelManager
    from studio.service import Paths, Studio
    from tabs.launch import launch_options

    studio = Studio(
        Paths(db=tmp / "g.db", images=tmp / "images"), ModelManager(device="cpu"), default_model=model
    )
    demo = build_app(studio)
    port = free_port()
    try:
        demo.queue(default_concurrency_limit=1).launch(
            prevent_thread_lock=True,
            server_name="127.0.0.1",
            server_port=port,
            quiet=True,
            **launch_options(studio),
        )
        yield f"http://127.0.0.1:{port}/", studio
    finally:
        demo.close()
        studio.close()


def server_tracebacks(capfd) -> str:
    """What the server printed to stderr as tracebacks since the last read (empty: none).

    Gradio prints a traceback for any exception an event raises other than a quiet gr.Error;
    a user's mistake must never produce one, and neither must an ordinary page load.
    """
    _, err = capfd.readouterr()
    start = err.find("Traceback (most recent call last)")
    return "" if start < 0 else err[start : start + 3000]
