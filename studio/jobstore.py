"""The gallery's job records: one row per job (`jobs` table, migration 0003), read back as
frozen `JobState`s.

`JobStore` is mixed into `Gallery`, whose connections, write lock and lifecycle it uses.
Each row names the process that owns it (`host:pid:start`, the start being the process's
start time in clock ticks, so that a reused pid is not taken for the old process): when a
gallery opens, queued or running jobs whose process has ended are marked "interrupted"
(a trainer resumes them from its checkpoints). Rows owned by another host are left alone.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

STATUSES = ("queued", "running", "done", "failed", "cancelled", "interrupted")
FINISHED = ("done", "failed", "cancelled", "interrupted")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

jobs_table = sa.Table(
    "jobs",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("kind", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("total", sa.Integer, nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("metrics", sa.Text, nullable=False),
    sa.Column("samples", sa.Text, nullable=False),
    sa.Column("out_dir", sa.Text, nullable=False),
    sa.Column("settings", sa.Text, nullable=False),
    sa.Column("result", sa.Text, nullable=False),
    sa.Column("error", sa.Text, nullable=False),
    sa.Column("owner", sa.String(128), nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("finished_at", sa.BigInteger),
)


@dataclass(frozen=True)
class JobState:
    """One job as stored: what it is, how far it got, and what it made."""

    id: int
    kind: str  # "evaluation", "training", ...
    status: str  # one of STATUSES
    step: int
    total: int
    message: str
    metrics: tuple[dict, ...]  # every report that carried metrics: {"step": 10, "loss": 0.1}
    samples: tuple[str, ...]  # image paths, newest last
    out_dir: str
    settings: dict
    result: dict
    error: str
    created_at: str  # ISO 8601, UTC
    finished_at: str | None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @property
    def fraction(self) -> float:
        """Share of the work done, in [0, 1]."""
        if self.status == "done":
            return 1.0
        return min(1.0, max(0.0, self.step / self.total)) if self.total > 0 else 0.0


def process_owner(pid: int | None = None) -> str:
    """`host:pid:start` naming a process (this one by default)."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_process_start(pid) or ''}"


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot; None if it is gone or a zombie
    (or /proc is not there, as on macOS)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (name)": state is field 3
    return None if fields[0] in ("Z", "X") else fields[19]  # starttime is field 22


def owner_alive(owner: str) -> bool:
    """Whether the process an owner string names still runs (another host's: assumed so)."""
    host, _, rest = owner.partition(":")
    pid_text, _, start = rest.partition(":")
    if host != socket.gethostname():
        return True
    if not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return True
    if Path("/proc").is_dir():
        return _process_start(pid) is not None and (not start or start == _process_start(pid))
    try:  # no /proc: ask the kernel whether the pid exists
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _now_us() -> int:
    delta = datetime.now(UTC) - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _iso(us: int | None) -> str | None:
    return None if us is None else (_EPOCH + timedelta(microseconds=us)).isoformat(timespec="seconds")


def _state(row) -> JobState:
    return JobState(
        id=row.id,
        kind=row.kind,
        status=row.status,
        step=row.step,
        total=row.total,
        message=row.message,
        metrics=tuple(json.loads(row.metrics)),
        samples=tuple(json.loads(row.samples)),
        out_dir=row.out_dir,
        settings=json.loads(row.settings),
        result=json.loads(row.result),
        error=row.error,
        created_at=_iso(row.created_at),
        finished_at=_iso(row.finished_at),
    )


class JobStore:
    """Job rows of the gallery database (mixed into `Gallery`)."""

    def add_job(self, kind: str, settings: dict, out_dir: str = "") -> JobState:
        """A new queued job owned by this process."""
        row = {
            "kind": kind,
            "status": "queued",
            "step": 0,
            "total": 0,
            "message": "",
            "metrics": "[]",
            "samples": "[]",
            "out_dir": str(out_dir),
            "settings": json.dumps(settings, allow_nan=False),
            "result": "{}",
            "error": "",
            "owner": process_owner(),
            "created_at": _now_us(),
            "finished_at": None,
        }
        with self._writer() as conn, conn.begin():
            new_id = conn.execute(jobs_table.insert().values(**row)).inserted_primary_key[0]
            return _state(conn.execute(sa.select(jobs_table).where(jobs_table.c.id == new_id)).one())

    def update_job(
        self,
        job_id: int,
        *,
        status: str | None = None,
        step: int | None = None,
        total: int | None = None,
        message: str | None = None,
        metrics: Iterable[dict] | None = None,
        samples: Iterable[str] | None = None,
        out_dir: str | None = None,
        result: dict | None = None,
        error: str | None = None,
    ) -> None:
        """Change the given fields; a finishing status stamps `finished_at`."""
        values: dict[str, Any] = {
            k: v
            for k, v in dict(status=status, step=step, total=total, message=message, out_dir=out_dir).items()
            if v is not None
        }
        if status is not None:
            if status not in STATUSES:
                raise ValueError(f"unknown job status {status!r}")
            if status in FINISHED:
                values["finished_at"] = _now_us()
        for name, value in (("metrics", metrics), ("samples", samples)):
            if value is not None:
                values[name] = json.dumps(list(value), allow_nan=False)
        if result is not None:
            values["result"] = json.dumps(result, allow_nan=False)
        if error is not None:
            values["error"] = error
        with self._writer() as conn, conn.begin():
            conn.execute(jobs_table.update().where(jobs_table.c.id == job_id).values(**values))

    def job(self, job_id: int) -> JobState | None:
        """The job with this id, or None."""
        with self._db().connect() as conn:
            row = conn.execute(sa.select(jobs_table).where(jobs_table.c.id == job_id)).first()
        return None if row is None else _state(row)

    def jobs(self, kind: str | None = None, limit: int = 20) -> list[JobState]:
        """The latest jobs (of one kind), newest first."""
        query = sa.select(jobs_table).order_by(jobs_table.c.id.desc()).limit(max(1, min(int(limit), 500)))
        if kind is not None:
            query = query.where(jobs_table.c.kind == kind)
        with self._db().connect() as conn:
            return [_state(row) for row in conn.execute(query)]

    def interrupt_stale_jobs(self) -> list[int]:
        """Mark queued or running jobs whose process has ended as interrupted; their ids."""
        with self._writer() as conn, conn.begin():
            return self._interrupt_stale_jobs(conn)

    def _interrupt_stale_jobs(self, conn: sa.Connection) -> list[int]:
        rows = conn.execute(
            sa.select(jobs_table.c.id, jobs_table.c.owner).where(
                jobs_table.c.status.in_(("queued", "running"))
            )
        ).all()
        stale = [r.id for r in rows if not owner_alive(r.owner)]
        if stale:
            conn.execute(
                jobs_table.update()
                .where(jobs_table.c.id.in_(stale))
                .values(
                    status="interrupted",
                    finished_at=_now_us(),
                    error="the process running it ended before it finished",
                )
            )
        return stale
