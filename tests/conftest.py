"""Shared fixtures: tiny pipelines (built once a session), a Studio on a temporary folder."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

TOY_SD = ROOT / "assets" / "models" / "toy-sd"
TOY_SD3 = ROOT / "assets" / "models" / "toy-sd3"


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    from tiny_models import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> Path:
    from tiny_models import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("models") / "tiny-sd3")


@pytest.fixture(scope="session")
def tiny_ip2p(tmp_path_factory, tiny_sd) -> Path:
    from tiny_models import build_tiny_ip2p

    return build_tiny_ip2p(tmp_path_factory.mktemp("models") / "tiny-ip2p", tiny_sd)


@pytest.fixture(scope="session")
def manager():
    from studio.models import ModelManager

    return ModelManager(device="cpu")


@pytest.fixture
def studio(tmp_path, manager):
    from studio.service import Paths, Studio

    s = Studio(Paths(db=tmp_path / "gallery.db", images=tmp_path / "images"), manager)
    yield s
    s.close()


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    from tiny_models import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_controlnet(tmp_path_factory, tiny_sd) -> Path:
    from tiny_models import build_tiny_controlnet

    return build_tiny_controlnet(tmp_path_factory.mktemp("models") / "tiny-controlnet", tiny_sd)


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory) -> Path:
    from tiny_models import build_tiny_adapter

    return build_tiny_adapter(tmp_path_factory.mktemp("models") / "tiny-adapter")


@pytest.fixture(scope="session")
def tiny_ip_adapter(tmp_path_factory, tiny_sd) -> Path:
    from tiny_models import build_tiny_ip_adapter

    return build_tiny_ip_adapter(tmp_path_factory.mktemp("models") / "tiny-ip-adapter", tiny_sd)


@contextlib.contextmanager
def denoiser_batches(manager, model):
    """The batch size of every denoiser forward on the cached pipeline of `model` in the block."""
    calls: list[int] = []
    pipe = manager.base(str(model))
    denoiser = getattr(pipe, "unet", None) or pipe.transformer

    def record(_module, args, kwargs):
        calls.append((args[0] if args else kwargs["hidden_states"]).shape[0])

    handle = denoiser.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()
