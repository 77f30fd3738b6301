"""Long work off the request path: evaluations now, training next.

A `JobRunner` runs submitted work one job at a time, first in first out, on one daemon
worker thread started by the first `submit`. Each `work(ctx)` runs inside `with lane:` (the
model manager's lane), so generations and jobs wait for each other; a job reads "queued"
until it holds the lane. The work reports progress, metrics and samples through its
`JobContext`, calls `ctx.check_cancel()` where it can stop, and returns a JSON-able dict,
the job's `result`. `JobCancelled` makes it "cancelled"; any other exception "failed", with
a one-line `error` (the traceback goes to the log).

Every job is a row of the gallery database (`studio.jobstore`), so its progress outlives the
browser that started it; reports are written at most every FLUSH_EVERY_S seconds (the last
one always, and the end at once), so that a fast loop is not slowed down. Jobs left unfinished by an ended process read
"interrupted"; so do the queued and running jobs of a runner that is closed.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .gallery import Gallery, InvalidValue, ItemNotFound
from .jobstore import JobState
from .progress import Cancelled
from .settings import Settings, SettingsError

__all__ = ["JobCancelled", "JobContext", "JobRunner", "JobState"]

log = logging.getLogger(__name__)

FLUSH_EVERY_S = 0.5
KIND = re.compile(r"[a-z][a-z0-9_-]{0,63}")


class JobCancelled(Cancelled):
    """Raised by `JobContext.check_cancel` once the job's cancel was asked."""


class JobContext:
    """What a job's work function gets: where to write, and how to report and stop."""

    def __init__(self, job_id: int, out_dir: Path, gallery: Gallery):
        self.job_id = job_id
        self.out_dir = out_dir
        self._gallery = gallery
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._pending: dict = {}  # fields not yet written
        self._metrics: list[dict] = []
        self._samples: list[str] = []
        self._flushed_at = 0.0
        self._timer: threading.Timer | None = None  # writes what a throttled report left

    def report(self, step: int, total: int, message: str = "", **metrics: float) -> None:
        """Progress (`step` of `total`), an optional message (kept until the next one), and
        metrics, recorded as `{"step": step, **metrics}` (a non-finite value as None)."""
        with self._lock:
            self._pending.update(step=int(step), total=int(total))
            if message:
                self._pending["message"] = message
            if metrics:
                entry = {"step": int(step)}
                for name, value in metrics.items():
                    value = float(value)
                    entry[name] = value if math.isfinite(value) else None
                self._metrics.append(entry)
                self._pending["metrics"] = list(self._metrics)
        self._flush()

    def add_sample(self, path: str | Path) -> None:
        """An image the work made along the way (a training sample), written at once."""
        with self._lock:
            self._samples.append(str(path))
            self._pending["samples"] = list(self._samples)
        self._flush(force=True)

    def check_cancel(self) -> None:
        """Raise JobCancelled once `JobRunner.cancel` was asked for this job."""
        if self._cancel.is_set():
            raise JobCancelled(f"job #{self.job_id} was cancelled")

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def _flush(self, force: bool = False, **final) -> None:
        """Write what is pending: now when forced or final, else at most every FLUSH_EVERY_S
        (a throttled report is written by a timer, so the last one is never lost)."""
        with self._lock:
            wait = self._flushed_at + FLUSH_EVERY_S - time.monotonic()
            if not force and not final and wait > 0:
                if self._timer is None:
                    self._timer = threading.Timer(wait, self._deferred)
                    self._timer.daemon = True
                    self._timer.start()
                return
            if final and self._timer is not None:
                self._timer.cancel()
            fields, self._pending = {**self._pending, **final}, {}
            self._flushed_at = time.monotonic()
        if fields:
            self._gallery.update_job(self.job_id, **fields)

    def _deferred(self) -> None:
        with self._lock:
            self._timer = None
        try:
            self._flush(force=True)
        except Exception:  # a late progress write; the job's own writes report failures
            log.exception("job #%s: progress could not be written", self.job_id)


class JobRunner:
    """Runs jobs one at a time on a worker thread, inside the lane; keeps them in the gallery."""

    def __init__(self, gallery: Callable[[], Gallery], lane: threading.RLock, root: Path):
        self._gallery_of = gallery
        self.lane = lane
        self.root = Path(root)
        self._lock = threading.Lock()
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._works: dict[int, Callable] = {}  # queued, not yet taken by the worker
        self._contexts: dict[int, JobContext] = {}  # queued or running here
        self._finished: dict[int, threading.Event] = {}
        self._thread: threading.Thread | None = None
        self._closing = False
        self._checked_stale = False

    def _gallery(self) -> Gallery:
        gallery = self._gallery_of()
        if not self._checked_stale:  # this runner's start: what ended processes left is interrupted
            gallery.interrupt_stale_jobs()
            self._checked_stale = True
        return gallery

    # ------------------------------------------------------------------ asking

    def submit(
        self,
        kind: str,
        settings: Settings,
        work: Callable[[JobContext], dict],
        *,
        out_dir: Path | None = None,
    ) -> int:
        """Queue `work` as a job of `kind`; its id. `out_dir` defaults to root/<id>-<kind>."""
        if not isinstance(kind, str) or not KIND.fullmatch(kind):
            raise SettingsError(f"a job kind is a short lowercase name like 'training', not {kind!r}")
        if self._closing:
            raise InvalidValue("the studio is shutting down: no new jobs")
        gallery = self._gallery()
        job_id = gallery.add_job(kind, settings.to_dict(), str(out_dir or "")).id
        if out_dir is None:
            out_dir = self.root / f"{job_id}-{kind}"
            gallery.update_job(job_id, out_dir=str(out_dir))
        with self._lock:
            self._contexts[job_id] = JobContext(job_id, Path(out_dir), gallery)
            self._works[job_id] = work
            self._finished[job_id] = threading.Event()
            if self._thread is None:
                self._thread = threading.Thread(target=self._work_loop, name="studio-jobs", daemon=True)
                self._thread.start()
        self._queue.put(job_id)
        return job_id

    def get(self, job_id: int) -> JobState:
        if isinstance(job_id, bool) or not isinstance(job_id, int):
            raise InvalidValue(f"a job id is a whole number, not {job_id!r}")
        state = self._gallery().job(job_id)
        if state is None:
            raise ItemNotFound(f"there is no job #{job_id}")
        return state

    def list(self, kind: str | None = None, limit: int = 20) -> list[JobState]:
        """The latest jobs (of one kind), newest first."""
        return self._gallery().jobs(kind, limit)

    def cancel(self, job_id: int) -> None:
        """A queued job never runs; a running one stops at its next `check_cancel`.
        A finished job stays as it is."""
        with self._lock:
            ctx = self._contexts.get(job_id)
            was_queued = self._works.pop(job_id, None) is not None
        if ctx is None:
            if not self.get(job_id).finished:
                raise InvalidValue(f"job #{job_id} runs in another process: cancel it there")
            return
        ctx._cancel.set()
        if was_queued:
            self._finish(ctx, "cancelled")

    def wait(self, job_id: int, timeout: float | None = None) -> JobState:
        """The job's state once it has finished, or when `timeout` seconds have passed."""
        with self._lock:
            event = self._finished.get(job_id)
        if event is not None:
            event.wait(timeout)
            return self.get(job_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:  # a job of another process: poll its row
            state = self.get(job_id)
            if state.finished or (deadline is not None and time.monotonic() >= deadline):
                return state
            time.sleep(0.2)

    def close(self, timeout: float = 10.0) -> None:
        """Stop: queued jobs and the running one (asked to cancel) become "interrupted"."""
        with self._lock:
            self._closing = True
            queued = [self._contexts[i] for i in self._works]
            self._works.clear()
            running = list(self._contexts.values())
            thread = self._thread
        for ctx in running:
            ctx._cancel.set()
        for ctx in queued:
            self._finish(ctx, "interrupted")
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)
            if thread.is_alive():
                log.warning("a job did not stop within %s s of closing", timeout)

    # ------------------------------------------------------------------ the worker

    def _work_loop(self) -> None:
        while (job_id := self._queue.get()) is not None:
            with self._lock:
                work = self._works.pop(job_id, None)
                ctx = self._contexts.get(job_id)
            if work is None:  # cancelled while queued
                continue
            try:
                self._run(ctx, work)
            except Exception:  # the database itself failed: keep serving the next jobs
                log.exception("job #%s could not be recorded", job_id)
                self._release(job_id)

    def _run(self, ctx: JobContext, work: Callable[[JobContext], dict]) -> None:
        with self.lane:
            if ctx.cancelled:  # cancelled while waiting for the lane
                self._finish(ctx, "interrupted" if self._closing else "cancelled")
                return
            ctx._flush(status="running")
            fields: dict = {}
            try:
                ctx.out_dir.mkdir(parents=True, exist_ok=True)
                fields["result"] = _json_result(work(ctx))
                status = "done"
            except Cancelled:
                status = "interrupted" if self._closing else "cancelled"
            except Exception as exc:
                log.exception("job #%s failed", ctx.job_id)
                status, fields["error"] = "failed", one_line(exc)
            self._finish(ctx, status, **fields)

    def _finish(self, ctx: JobContext, status: str, **fields) -> None:
        try:
            ctx._flush(status=status, **fields)
        finally:
            self._release(ctx.job_id)

    def _release(self, job_id: int) -> None:
        with self._lock:
            self._contexts.pop(job_id, None)
            event = self._finished.pop(job_id, None)
        if event is not None:
            event.set()


def _json_result(result) -> dict:
    if not isinstance(result, dict):
        raise TypeError(f"a job's work must return a dict, not {type(result).__name__}")
    try:
        return json.loads(json.dumps(result, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"a job's result must be plain JSON ({exc})") from None


def one_line(exc: BaseException) -> str:
    """An exception as one short line: a user's mistake (ValueError) by its message alone,
    anything else with its type in front."""
    line = next((part.strip() for part in str(exc).splitlines() if part.strip()), "")
    if not isinstance(exc, ValueError):
        line = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    return line[:300] or "failed"
