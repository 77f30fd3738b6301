"""Launch options shared by the app and every tab run alone: what may and may not be served."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def launch_options(studio, **overrides) -> dict:
    """Serve gallery images; never the database, the weights or the source tree."""
    studio.paths.images.mkdir(parents=True, exist_ok=True)
    options = dict(
        allowed_paths=[str(studio.paths.images.resolve())],
        blocked_paths=[
            str(studio.paths.db.resolve()),
            str(studio.paths.db.resolve()) + "-wal",
            str(studio.paths.db.resolve()) + "-shm",
            str(studio.paths.db.resolve()) + "-journal",
            str(REPO_ROOT / "assets"),
            str(REPO_ROOT / "studio"),
            str(REPO_ROOT / "runs"),
            str(REPO_ROOT / "models"),  # annotator weights
        ],
        max_file_size="20mb",
    )
    options.update(overrides)
    return options


def run_alone(build, title: str) -> None:
    """Serve one tab by itself (`python -m tabs.NAME`) on a default Studio."""
    import gradio as gr

    from studio.service import Studio

    from .common import make_bus

    studio = Studio()
    with gr.Blocks(title=f"Latent Studio · {title}") as demo:
        build(studio, make_bus())
    demo.queue().launch(**launch_options(studio))
