"""What every tab shares: the GPU lane id, the settings bus and error display.

Tabs talk to each other only through the `Bus`: a hidden JSON component carrying a
settings dict (`{"technique": ..., ...}`) plus the gallery id of an image when one is
sent along. "Restore settings", "send to" and share links write to it; each tab listens
and fills its own widgets when the technique is its own. The app switches tabs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import gradio as gr

GPU_LANE = "gpu"  # every event that runs a model or trains shares this concurrency id

TAB_IDS = {
    "txt2img": "txt2img",
    "gallery": "gallery",
    "sdedit": "editing",
    "ip2p": "editing",
    "controlnet": "controlnet",
    "ip_adapter": "ip_adapter",
}


@dataclass
class Bus:
    message: gr.JSON  # {"target": tab id, "settings": {...} | None, "image_id": int | None, "nonce": n}


def make_bus() -> Bus:
    return Bus(message=gr.JSON(visible=False, value=None))


def user_errors(fn):
    """Show a user's mistake as gr.Error (one clear sentence), never as a traceback."""
    from studio.gallery import GalleryError
    from studio.models import ModelError
    from studio.settings import SettingsError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (SettingsError, ModelError, GalleryError) as exc:
            raise gr.Error(str(exc), print_exception=False) from None

    return wrapper


def user_errors_gen(fn):
    """`user_errors` for generator event functions (streaming previews)."""
    from studio.gallery import GalleryError
    from studio.models import ModelError
    from studio.settings import SettingsError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            yield from fn(*args, **kwargs)
        except (SettingsError, ModelError, GalleryError) as exc:
            raise gr.Error(str(exc), print_exception=False) from None

    return wrapper


def on_gpu(fn):
    """`spaces.GPU` where the `spaces` package is present (Hugging Face ZeroGPU); else `fn`."""
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(fn)


_nonce = 0


def bus_message(target: str, settings: dict | None = None, image_id: int | None = None) -> dict:
    """A new bus value (the nonce makes a repeated message still count as a change)."""
    global _nonce
    _nonce += 1
    return {"target": target, "settings": settings, "image_id": image_id, "nonce": _nonce}
