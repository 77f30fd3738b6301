"""Step reports and cancellation, shared by every technique and the trainer."""

from __future__ import annotations

import threading
from dataclasses import dataclass


class Cancelled(Exception):
    """Raised from a step callback to stop a run; nothing half-made is stored."""


@dataclass(frozen=True)
class StepInfo:
    step: int  # 1-based, within the current batch
    total: int
    batch: int = 0
    batches: int = 1
    latents: object = None  # the denoiser's current latents, for previews

    @property
    def fraction(self) -> float:
        return (self.batch * self.total + self.step) / (self.batches * self.total)


def step_callback(on_step, total: int, batch: int = 0, batches: int = 1):
    """A diffusers `callback_on_step_end` that reports each step to `on_step` (which may raise
    Cancelled to stop the run); None when nobody listens."""
    if on_step is None:
        return None

    def callback(_pipe, i, _t, kw):
        on_step(StepInfo(i + 1, total, batch, batches, kw.get("latents")))
        return kw

    return callback


def legacy_step_callback(on_step, total: int, batch: int = 0, batches: int = 1):
    """`step_callback` for pipelines that still take the old `callback(step, timestep, latents)`
    (the T2I-Adapter ones): the same reports, the same way to cancel."""
    if on_step is None:
        return None

    def callback(i, _t, latents):
        on_step(StepInfo(i + 1, total, batch, batches, latents))

    return callback


class CancelToken:
    """Set by a Stop button or a signal; checked at every step."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    def reset(self) -> None:
        self._event.clear()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled")
