"""What every tab shares: the GPU lane id, the settings bus, error display, and runs with
live previews and Stop.

Tabs talk to each other only through the `Bus`: a hidden JSON component carrying a
settings dict (`{"technique": ..., ...}`) plus the gallery id of an image when one is
sent along. "Restore settings", "send to" and share links write to it; each tab listens
and fills its own widgets when the technique is its own. The app switches tabs.
"""

from __future__ import annotations

import functools
import queue
import threading
from dataclasses import dataclass

import gradio as gr

from studio.progress import Cancelled, CancelToken
from studio.settings import SettingsError

GPU_LANE = "gpu"  # every event that runs a model or trains shares this concurrency id
PREVIEW_EVERY = 5  # steps between live previews

TAB_IDS = {
    "txt2img": "txt2img",
    "gallery": "gallery",
    "sdedit": "editing",
    "ip2p": "editing",
    "p2p": "p2p",
    "controlnet": "controlnet",
    "evaluate": "evaluation",
    "train": "trainer",
    "ip_adapter": "ip_adapter",
}


@dataclass
class Bus:
    message: gr.JSON  # {"target": tab id, "settings": {...} | None, "image_id": int | None, "nonce": n}


def make_bus() -> Bus:
    return Bus(message=gr.JSON(visible=False, value=None))


def tab_switch(message: dict | None) -> gr.Tabs:
    """The app's tab switch: the tab a bus message is for (register it with `on_message`)."""
    target = (message or {}).get("target")
    return gr.Tabs(selected=target) if target else gr.skip()


def once_per_message(fn, outputs: list, seen: gr.State):
    """`fn(message, *inputs)` (its outputs' updates: a dict keyed by component, values in
    `outputs` order, or gr.skip()) run at most once per bus message.

    The browser can deliver one message's change event twice: a message that lands while the
    previous one's listeners are still being called is read again by the rest of them, the
    second time seconds later. A second run would overwrite a form the user edited meanwhile,
    or switch back from a tab they picked, so the wrapped function remembers the nonce it
    handled in `seen` (its last output) and does nothing for a nonce already handled."""

    def handle(message, handled, *inputs):
        nonce = (message or {}).get("nonce")
        if nonce is None or nonce == handled:
            return gr.skip()
        result = fn(message, *inputs)
        if result == gr.skip():
            updates = {}
        elif isinstance(result, dict):
            updates = result
        elif isinstance(result, (list, tuple)):
            updates = dict(zip(outputs, result, strict=True))
        else:
            updates = {outputs[0]: result}
        return {**updates, seen: nonce}

    return handle


def on_message(bus: Bus, fn, outputs: list, inputs: tuple = (), seen: gr.State | None = None, **event):
    """Listen to the settings bus with `fn(message, *inputs)`, once per message (see
    `once_per_message`). `seen` is created here unless given: call this inside a tab, never as a
    direct child of `gr.Tabs` (a State there breaks the tab bar)."""
    seen = gr.State(None) if seen is None else seen
    bus.message.change(
        once_per_message(fn, outputs, seen),
        [bus.message, seen, *inputs],
        [*outputs, seen],
        api_visibility="private",
        **event,
    )


def user_errors(fn):
    """Show a user's mistake as gr.Error (one clear sentence), never as a traceback."""
    from studio.gallery import GalleryError
    from studio.models import ModelError

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


def api_only(fn, api_name: str, *, files: tuple[str, ...] = (), pictures: bool = True) -> None:
    """An endpoint for API clients only, on the GPU lane: hidden inputs (a file input per entry
    of `files`, "one" or "many" pictures, then the settings as JSON) and hidden outputs (the
    pictures when `pictures`, then a JSON report). Must be called inside the tab's Blocks."""
    inputs = [
        gr.File(visible=False, type="filepath", file_count="multiple" if f == "many" else "single")
        for f in files
    ] + [gr.JSON(visible=False)]
    outputs = ([gr.Gallery(visible=False, format="png")] if pictures else []) + [gr.JSON(visible=False)]
    gr.Button(visible=False).click(
        fn,
        inputs if len(inputs) > 1 else inputs[0],
        outputs if len(outputs) > 1 else outputs[0],
        api_name=api_name,
        concurrency_id=GPU_LANE,
        concurrency_limit=1,
    )


def bus_message(target: str, settings: dict | None = None, image_id: int | None = None) -> dict:
    """A new bus value (the nonce makes a repeated message still count as a change)."""
    global _nonce
    _nonce += 1
    return {"target": target, "settings": settings, "image_id": image_id, "nonce": _nonce}


class SessionRuns:
    """Runs of a tab, one cancel token per browser session: Stop cancels that session's run.

    `stream` runs `job(on_step)` on a worker thread, so the event can yield previews while
    the pipeline samples; it yields ("preview", image) every PREVIEW_EVERY steps, then
    ("done", the job's value) or ("cancelled", None). Any other error is raised in the
    event's thread, where `user_errors_gen` shows it.
    """

    def __init__(self, studio):
        self.studio = studio
        self._tokens: dict[str, CancelToken] = {}

    def cancel(self, request: gr.Request | None) -> None:
        token = self._tokens.get(_session(request))
        if token:
            token.cancel()

    def stream(self, request: gr.Request | None, progress, model: str, job):
        token = self._tokens.setdefault(_session(request), CancelToken())
        token.reset()
        updates: queue.Queue = queue.Queue()
        spec = self.studio.models.resolve(model)

        def on_step(step):
            token.check()
            progress(step.fraction, desc=f"step {step.step}/{step.total}")
            if step.latents is not None and (step.step % PREVIEW_EVERY == 0):
                updates.put(("preview", self.studio.preview(step.latents, spec)))

        def work():
            try:
                updates.put(("done", job(on_step)))
            except BaseException as exc:  # handed to the event thread, which reports it
                updates.put(("error", exc))

        threading.Thread(target=work, daemon=True).start()
        while True:
            kind, payload = updates.get()
            if kind == "error":
                if isinstance(payload, Cancelled):
                    yield "cancelled", None
                    return
                raise payload
            yield kind, payload
            if kind == "done":
                return


def share_link(request: gr.Request | None, settings) -> str:
    """The share link of `settings` on the server the request came to."""
    from studio.presets import share_url

    base = str(request.request.base_url) if request and request.request else "http://127.0.0.1:7860/"
    return share_url(base, settings)


def _session(request: gr.Request | None) -> str:
    return request.session_hash if request else ""


# ---------------------------------------------------------------------------- jobs on a page


def progress_bar(fraction: float) -> str:
    return (
        f'<progress value="{fraction:.3f}" max="1" style="width: 85%"></progress> '
        f"<span>{round(100 * fraction)}%</span>"
    )


def table_value(headers: list[str], rows: list[list]) -> dict:
    return {"headers": headers, "data": rows or [[""] * len(headers)]}


def row_id(evt: gr.SelectData) -> int | None:
    """The id in the first column of a picked table row (None for the empty table's row)."""
    value = (evt.row_value or [None])[0]
    try:
        return int(value) if float(value) == int(float(value)) else None
    except (TypeError, ValueError):
        return None


def whole(name: str, value, *, required: bool = False) -> int | None:
    """A form's number box as a whole number; an empty box is None, or refused when `required`."""
    if value is None or value == "":
        if required:
            raise SettingsError(f"{name} is empty: give a whole number")
        return None
    if float(value) != int(value):
        raise SettingsError(f"{name} must be a whole number, not {value}")
    return int(value)
