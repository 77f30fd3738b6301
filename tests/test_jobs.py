"""Jobs: first in first out on the lane, states a user sees, cancel, failures, crashes, metrics."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass

import pytest
from conftest import ROOT

from studio.gallery import Gallery, ItemNotFound
from studio.jobs import JobContext, JobRunner
from studio.settings import Settings

WAIT = 30  # seconds: the machine may be busy training


@dataclass(frozen=True)
class Note(Settings):
    technique = "note"
    text: str = ""


@pytest.fixture
def gallery(tmp_path):
    g = Gallery(tmp_path / "g.db", tmp_path / "images").open()
    yield g
    g.close()


@pytest.fixture
def lane():
    return threading.RLock()


@pytest.fixture
def runner(tmp_path, gallery, lane):
    r = JobRunner(lambda: gallery, lane, tmp_path / "jobs")
    yield r
    r.close()


def until(condition, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def blocker(release: threading.Event, started: threading.Event | None = None):
    """Work that holds the lane until `release` is set (or the job is cancelled)."""

    def work(ctx: JobContext) -> dict:
        if started:
            started.set()
        while not release.wait(0.01):
            ctx.check_cancel()
        return {"released": True}

    return work


def test_jobs_run_first_in_first_out_and_report_their_states(runner):
    order, release, started = [], threading.Event(), threading.Event()
    first = runner.submit("evaluation", Note("first"), blocker(release, started))
    rest = [
        runner.submit("evaluation", Note(str(i)), lambda ctx, i=i: order.append(i) or {"i": i})
        for i in range(3)
    ]
    assert started.wait(WAIT)
    assert runner.get(first).status == "running"
    assert [runner.get(j).status for j in rest] == ["queued"] * 3
    release.set()
    states = [runner.wait(j, WAIT) for j in rest]
    assert order == [0, 1, 2]
    assert [(s.status, s.result, s.finished, s.fraction) for s in states] == [
        ("done", {"i": i}, True, 1.0) for i in range(3)
    ]
    done = runner.get(first)
    assert done.result == {"released": True} and done.settings == Note("first").to_dict()
    assert done.finished_at is not None and done.created_at <= done.finished_at
    assert [s.id for s in runner.list("evaluation")] == rest[::-1] + [first]
    assert runner.list("training") == []
    with pytest.raises(ItemNotFound, match="there is no job #999"):
        runner.get(999)


def test_a_cancelled_queued_job_never_runs(runner):
    ran, release = [], threading.Event()
    first = runner.submit("evaluation", Note(), blocker(release))
    second = runner.submit("evaluation", Note(), lambda ctx: ran.append(1) or {})
    runner.cancel(second)
    assert runner.get(second).status == "cancelled"
    release.set()
    assert runner.wait(first, WAIT).status == "done"
    third = runner.submit("evaluation", Note(), lambda ctx: {"ok": 1})
    assert runner.wait(third, WAIT).status == "done"
    assert ran == [] and runner.get(second).status == "cancelled"


def test_a_running_job_stops_at_its_next_check(runner):
    steps = []

    def work(ctx):
        for step in range(1_000_000):
            ctx.check_cancel()
            steps.append(step)
            ctx.report(step, 1_000_000, "working")
            time.sleep(0.001)
        return {}

    job = runner.submit("training", Note(), work)
    until(lambda: len(steps) > 5)
    runner.cancel(job)
    state = runner.wait(job, WAIT)
    assert state.status == "cancelled" and state.error == ""
    assert 0 < state.step <= steps[-1] < 1_000_000 - 1
    runner.cancel(job)  # cancelling a finished job changes nothing
    assert runner.get(job).status == "cancelled"


def test_a_failing_job_gets_a_one_line_error_and_the_next_job_runs(runner):
    def crash(ctx):
        raise RuntimeError("disk full\n  while writing step 3")

    def refuse(ctx):
        raise ValueError("the learning rate must be positive")

    failed = runner.wait(runner.submit("training", Note(), crash), WAIT)
    assert failed.status == "failed" and failed.error == "RuntimeError: disk full"
    refused = runner.wait(runner.submit("training", Note(), refuse), WAIT)
    assert refused.error == "the learning rate must be positive"
    odd = runner.wait(runner.submit("training", Note(), lambda ctx: {"x": object()}), WAIT)
    assert odd.status == "failed" and odd.error.startswith("TypeError: a job's result must be plain JSON")
    assert runner.wait(runner.submit("training", Note(), lambda ctx: {"ok": True}), WAIT).status == "done"


def test_jobs_and_a_lane_holder_exclude_each_other(runner, lane):
    release = threading.Event()
    with lane:  # a generation holds the lane: the job waits, queued
        job = runner.submit("evaluation", Note(), blocker(release))
        time.sleep(0.3)
        assert runner.get(job).status == "queued"
    until(lambda: runner.get(job).status == "running")
    held = []
    grabber = threading.Thread(target=lambda: held.append(lane.acquire(timeout=0.3)))
    grabber.start()
    grabber.join()
    assert held == [False]  # the job holds the lane while it runs
    release.set()
    assert runner.wait(job, WAIT).status == "done"
    assert lane.acquire(timeout=WAIT)
    lane.release()


def test_progress_metrics_and_samples_round_trip(runner, gallery, tmp_path):
    writes = []
    update = gallery.update_job
    gallery.update_job = lambda *a, **k: writes.append(k) or update(*a, **k)
    halfway, release = threading.Event(), threading.Event()

    def work(ctx):
        for step in range(1, 2001):
            ctx.report(step, 2000, f"step {step}", **({"loss": 1 / step} if step % 100 == 0 else {}))
        path = ctx.out_dir / "sample-1.png"
        path.write_bytes(b"png")
        ctx.add_sample(path)
        ctx.report(1000, 2000, "halfway", loss=float("nan"))
        halfway.set()
        release.wait(WAIT)
        return {"final_loss": 0.0005}

    job = runner.submit("training", Note(), work)
    assert halfway.wait(WAIT)
    until(lambda: runner.get(job).message == "halfway")  # at most FLUSH_EVERY_S late
    seen = runner.get(job)
    assert seen.status == "running" and seen.fraction == 0.5
    assert seen.samples == (str(tmp_path / "jobs" / f"{job}-training" / "sample-1.png"),)
    release.set()
    state = runner.wait(job, WAIT)
    assert state.metrics[:2] == ({"step": 100, "loss": 0.01}, {"step": 200, "loss": 0.005})
    assert len(state.metrics) == 21 and state.metrics[-1] == {"step": 1000, "loss": None}
    assert state.out_dir == str(tmp_path / "jobs" / f"{job}-training")
    assert state.result == {"final_loss": 0.0005} and state.status == "done"
    assert len(writes) < 50  # 2,000 reports, throttled


def test_closing_the_runner_interrupts_its_unfinished_jobs(tmp_path, gallery, lane):
    runner = JobRunner(lambda: gallery, lane, tmp_path / "jobs")
    running = runner.submit("training", Note(), blocker(threading.Event()))
    queued = runner.submit("training", Note(), lambda ctx: {})
    until(lambda: runner.get(running).status == "running")
    runner.close()
    assert [gallery.job(j).status for j in (running, queued)] == ["interrupted", "interrupted"]


CRASHING = """
import sys, time, threading
from pathlib import Path
from studio.gallery import Gallery
from studio.jobs import JobRunner
from test_jobs import Note

folder = Path(sys.argv[1])
gallery = Gallery(folder / "g.db", folder / "images")
runner = JobRunner(lambda: gallery, threading.RLock(), folder / "jobs")

def work(ctx):
    ctx.report(3, 10, "training")
    print("running", flush=True)
    time.sleep(600)

runner.submit("training", Note(), work)
runner.submit("training", Note(), work)
time.sleep(600)
"""


def test_jobs_of_a_crashed_process_read_interrupted(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent(CRASHING))
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
    child = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    try:
        assert child.stdout.readline().strip() == "running"
        alive = Gallery(tmp_path / "g.db", tmp_path / "images").open()  # the process lives: untouched
        until(lambda: alive.job(1).step == 3)
        assert [j.status for j in alive.jobs()] == ["queued", "running"]
        alive.close()
    finally:
        child.kill()
        child.wait()
    reopened = Gallery(tmp_path / "g.db", tmp_path / "images").open()
    try:
        jobs = reopened.jobs()
        assert [j.status for j in jobs] == ["interrupted", "interrupted"]
        assert jobs[1].step == 3 and jobs[1].message == "training" and jobs[1].finished
        assert "ended before it finished" in jobs[1].error
    finally:
        reopened.close()
