"""Image gallery: generated images on disk plus a SQLite catalogue (SQLAlchemy 2.x Core).

* Lazy: nothing touches the disk until the first call (or :meth:`Gallery.open`). Opening runs the
  Alembic migrations in ``studio/migrations`` to head and then :meth:`Gallery.reconcile`.
* SQLite in WAL mode with ``busy_timeout=5000`` and foreign keys on; every call uses its own
  connection, writers use ``BEGIN IMMEDIATE`` behind one in-process lock, so the object is
  thread-safe.
* Crash safety: a new image is written to ``.tmp-<name>`` (fsynced), its row is inserted in a
  transaction, the file is renamed into place and then the transaction commits. A crash anywhere
  leaves either a committed row with its file, or a stray file that :meth:`Gallery.reconcile`
  removes. Deletion runs the same way in reverse. Adds and reconciles also take a shared /
  exclusive ``flock`` on ``<image_dir>/.gallery.lock`` so that a second process can't reconcile
  away an image that is being added.
* Prompts are indexed by an FTS5 external-content table kept in sync by triggers; user search
  text is only ever used as quoted phrases.
* Every call returns plain frozen dataclasses, never ORM rows. Errors the user can cause raise
  :class:`GalleryError` (a :class:`ValueError`) subclasses.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import secrets
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from PIL import Image

from studio import pngmeta
from studio.jobstore import JobState, JobStore

try:  # POSIX only; elsewhere the cross-process lock is skipped.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "MIGRATIONS_DIR",
    "Evaluation",
    "Gallery",
    "GalleryError",
    "GalleryItem",
    "ImageRejected",
    "InvalidValue",
    "ItemNotFound",
    "JobState",
    "Page",
    "ReconcileReport",
    "upgrade_database",
]

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
TEMP_PREFIX = ".tmp-"
LOCK_NAME = ".gallery.lock"

MAX_PROMPT_CHARS = 16_000
MAX_TAGS = 32
MAX_TAG_CHARS = 64
MAX_PAGE_SIZE = 500
MAX_QUERY_CHARS = 1_000
MAX_QUERY_TERMS = 32
_FTS_SCAN_THRESHOLD = 2_000
_INT64 = (-(2**63), 2**63 - 1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# --------------------------------------------------------------------------------------------
# Errors and value types
# --------------------------------------------------------------------------------------------


class GalleryError(ValueError):
    """Base class for errors a user can cause; the message is one readable sentence."""


class ItemNotFound(GalleryError):
    """The requested gallery item doesn't exist (any more)."""


class InvalidValue(GalleryError):
    """An argument has the wrong type or is out of range."""


class ImageRejected(GalleryError):
    """An image file can't be imported (not a PNG, corrupt, too large, no metadata...)."""


@dataclass(frozen=True)
class GalleryItem:
    id: int
    technique: str
    model: str
    prompt: str
    negative_prompt: str
    seed: int | None
    steps: int | None
    guidance: float | None
    width: int
    height: int
    scheduler: str | None
    settings: dict[str, Any]
    image_path: str  # absolute path of the PNG
    sha256: str
    parent_id: int | None
    duration_s: float
    created_at: datetime  # timezone-aware, UTC
    favourite: bool
    tags: tuple[str, ...]


@dataclass(frozen=True)
class Page:
    items: tuple[GalleryItem, ...]
    total: int
    page: int = 0
    page_size: int = 24

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.page_size))


@dataclass(frozen=True)
class ReconcileReport:
    temp_files_removed: int = 0
    orphan_files_removed: int = 0
    missing_rows_removed: int = 0
    missing_rows_kept: int = 0  # rows left alone because too many files were missing at once

    @property
    def changed(self) -> bool:
        return bool(self.temp_files_removed or self.orphan_files_removed or self.missing_rows_removed)


# --------------------------------------------------------------------------------------------
# Schema (mirrors migrations/versions; the migrations own the DDL)
# --------------------------------------------------------------------------------------------

_metadata = sa.MetaData()

images = sa.Table(
    "images",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("technique", sa.String(64), nullable=False),
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("prompt", sa.Text, nullable=False),
    sa.Column("negative_prompt", sa.Text, nullable=False),
    sa.Column("seed", sa.BigInteger),
    sa.Column("steps", sa.Integer),
    sa.Column("guidance", sa.Float),
    sa.Column("width", sa.Integer, nullable=False),
    sa.Column("height", sa.Integer, nullable=False),
    sa.Column("scheduler", sa.String(128)),
    sa.Column("settings", sa.Text, nullable=False),
    sa.Column("image_path", sa.String(255), nullable=False, unique=True),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("parent_id", sa.Integer, sa.ForeignKey("images.id", ondelete="SET NULL")),
    sa.Column("duration_s", sa.Float, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),  # µs since epoch, UTC
    sa.Column("favourite", sa.Boolean, nullable=False),
)

image_tags = sa.Table(
    "image_tags",
    _metadata,
    sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("tag", sa.String(64), primary_key=True),
)

# The FTS5 virtual table, described only so queries can be built with Core.
_images_fts = sa.Table("images_fts", sa.MetaData(), sa.Column("rowid", sa.Integer))

evaluations = sa.Table(
    "evaluations",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("settings", sa.Text, nullable=False),
    sa.Column("results", sa.Text, nullable=False),
    sa.Column("figure_ids", sa.Text, nullable=False),
    sa.Column("duration_s", sa.Float, nullable=False),
)


@dataclass(frozen=True)
class Evaluation:
    id: int
    created_at: datetime
    settings: dict
    results: dict
    figure_ids: tuple[int, ...]
    duration_s: float


def _make_engine(db_path: Path) -> sa.Engine:
    url = sa.engine.URL.create("sqlite", database=str(db_path))
    engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 5.0})

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (below)
        cursor = dbapi_conn.cursor()
        try:
            cursor.execute("PRAGMA busy_timeout=5000")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        immediate = conn.get_execution_options().get("sqlite_immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def upgrade_database(engine: sa.Engine, revision: str = "head") -> None:
    """Run the Alembic migrations in :data:`MIGRATIONS_DIR` up to ``revision`` (idempotent)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR.absolute()).replace("%", "%%"))
    with engine.connect() as conn:
        conn.execution_options(sqlite_immediate=True)
        with conn.begin():
            config.attributes["connection"] = conn
            command.upgrade(config, revision)


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _text(name: str, value: Any, max_chars: int, *, required: bool = False) -> str:
    if not isinstance(value, str):
        raise InvalidValue(f"The {name} must be text, not {type(value).__name__}.")
    if required and not value.strip():
        raise InvalidValue(f"The {name} must not be empty.")
    if len(value) > max_chars:
        raise InvalidValue(f"The {name} is longer than {max_chars:,} characters.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidValue(f"The {name} contains invalid Unicode.") from None
    return value


def _opt_text(name: str, value: Any, max_chars: int) -> str | None:
    return None if value is None else _text(name, value, max_chars)


def _opt_int(name: str, value: Any, low: int, high: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidValue(f"The {name} must be a whole number, not {type(value).__name__}.")
    if not low <= value <= high:
        raise InvalidValue(f"The {name} must be between {low} and {high}, got {value}.")
    return int(value)


def _int(name: str, value: Any, low: int, high: int) -> int:
    if value is None:
        raise InvalidValue(f"The {name} is required.")
    result = _opt_int(name, value, low, high)
    assert result is not None
    return result


def _opt_float(name: str, value: Any, low: float, high: float) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidValue(f"The {name} must be a number, not {type(value).__name__}.")
    value = float(value)
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidValue(f"The {name} must be between {low:g} and {high:g}, got {value!r}.")
    return value


def _item_id(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidValue(f"An image id must be a whole number, not {type(value).__name__}.")
    return value


def _tags(tags: Any) -> tuple[str, ...]:
    if isinstance(tags, str) or not isinstance(tags, Iterable):
        raise InvalidValue("Tags must be a list of strings.")
    result: list[str] = []
    for tag in tags:
        if not isinstance(tag, str):
            raise InvalidValue(f"Each tag must be text, not {type(tag).__name__}.")
        tag = " ".join(tag.split())
        if not tag:
            continue
        if len(tag) > MAX_TAG_CHARS or not tag.isprintable():
            raise InvalidValue(f"Tags must be printable text of at most {MAX_TAG_CHARS} characters.")
        if tag not in result:
            result.append(tag)
    if len(result) > MAX_TAGS:
        raise InvalidValue(f"An image can have at most {MAX_TAGS} tags.")
    return tuple(sorted(result))


def _settings_json(settings: Any) -> str:
    if not isinstance(settings, dict):
        raise InvalidValue("The settings must be a dict.")
    try:
        data = json.dumps(settings, ensure_ascii=False, allow_nan=False, sort_keys=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidValue(f"The settings can't be stored as JSON ({exc}).") from None
    if len(data) > pngmeta.MAX_SETTINGS_BYTES:
        raise InvalidValue("The settings are too large to store.")
    return data


def _to_us(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise InvalidValue(f"The {name} date must be a datetime, not {type(value).__name__}.")
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


_WORD = re.compile(r"[^\W_]", re.UNICODE)


def fts_query(text: str) -> str | None:
    """Turn user text into a safe FTS5 query: whitespace-separated chunks become quoted phrases.

    Chunks without a letter or digit are dropped; ``None`` means "no words, match everything".
    Inside double quotes FTS5 treats ``AND``/``NEAR(``/``*``/``:``/``^`` as plain text.
    """
    terms: list[str] = []
    for chunk in text[:MAX_QUERY_CHARS].split():
        if _WORD.search(chunk):
            terms.append('"' + chunk.replace('"', '""') + '"')
            if len(terms) >= MAX_QUERY_TERMS:
                break
    return " ".join(terms) if terms else None


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False


# --------------------------------------------------------------------------------------------
# The gallery
# --------------------------------------------------------------------------------------------


class Gallery(JobStore):
    """The image catalogue (and the job records, see `studio.jobstore`). Cheap to construct; connects and migrates on first use."""

    def __init__(self, db_path: str | os.PathLike[str], image_dir: str | os.PathLike[str]) -> None:
        self.db_path = Path(db_path)
        self.image_dir = Path(image_dir)
        self._engine: sa.Engine | None = None
        self._ready = False
        self._open_lock = threading.Lock()
        self._write_lock = threading.RLock()
        #: What the reconcile run by :meth:`open` did.
        self.last_reconcile: ReconcileReport | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def open(self) -> Gallery:
        """Connect, migrate to head, reconcile files with rows and mark the jobs of ended
        processes interrupted. Safe to call repeatedly."""
        with self._open_lock:
            if self._ready:
                return self
            self.image_dir.mkdir(parents=True, exist_ok=True)
            self.db_path.parent.mkdir(parents=True, exist_ok=True)
            engine = _make_engine(self.db_path)
            try:
                upgrade_database(engine)
                self._engine = engine
                self.last_reconcile = self._reconcile()
                with engine.connect() as conn:
                    conn.execution_options(sqlite_immediate=True)
                    with self._write_lock, conn.begin():
                        interrupted = self._interrupt_stale_jobs(conn)
            except BaseException:
                self._engine = None
                engine.dispose()
                raise
            self._ready = True
            if self.last_reconcile.changed or self.last_reconcile.missing_rows_kept:
                log.warning("gallery reconcile on open: %s", self.last_reconcile)
            if interrupted:
                log.warning("jobs left unfinished by an ended process, now interrupted: %s", interrupted)
        return self

    def close(self) -> None:
        with self._open_lock:
            if self._engine is not None:
                self._engine.dispose()
            self._engine = None
            self._ready = False

    def __enter__(self) -> Gallery:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _db(self) -> sa.Engine:
        if not self._ready:
            self.open()
        assert self._engine is not None
        return self._engine

    @contextlib.contextmanager
    def _file_lock(self, exclusive: bool) -> Iterator[None]:
        if fcntl is None:  # pragma: no cover
            yield
            return
        fd = os.open(self.image_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the lock

    @contextlib.contextmanager
    def _writer(self) -> Iterator[sa.Connection]:
        """A connection for one write transaction (BEGIN IMMEDIATE), committed by the caller."""
        engine = self._db()
        with self._write_lock, engine.connect() as conn:
            conn.execution_options(sqlite_immediate=True)
            yield conn

    @staticmethod
    def _commit(transaction: sa.RootTransaction) -> None:
        """Commit seam (tests make it raise to simulate a failing commit)."""
        transaction.commit()

    # -- reading ------------------------------------------------------------------------------

    def _item(self, row: sa.Row[Any], tags: Sequence[str] = ()) -> GalleryItem:
        try:
            settings = json.loads(row.settings)
        except ValueError:
            settings = {}
        return GalleryItem(
            id=row.id,
            technique=row.technique,
            model=row.model,
            prompt=row.prompt,
            negative_prompt=row.negative_prompt,
            seed=row.seed,
            steps=row.steps,
            guidance=row.guidance,
            width=row.width,
            height=row.height,
            scheduler=row.scheduler,
            settings=settings if isinstance(settings, dict) else {},
            image_path=str(self.image_dir / row.image_path),
            sha256=row.sha256,
            parent_id=row.parent_id,
            duration_s=row.duration_s,
            created_at=_from_us(row.created_at),
            favourite=bool(row.favourite),
            tags=tuple(tags),
        )

    def _items(self, conn: sa.Connection, rows: Sequence[sa.Row[Any]]) -> list[GalleryItem]:
        if not rows:
            return []
        tags: dict[int, list[str]] = {}
        query = (
            sa.select(image_tags.c.image_id, image_tags.c.tag)
            .where(image_tags.c.image_id.in_([r.id for r in rows]))
            .order_by(image_tags.c.tag)
        )
        for image_id, tag in conn.execute(query):
            tags.setdefault(image_id, []).append(tag)
        return [self._item(r, tags.get(r.id, ())) for r in rows]

    def _get(self, conn: sa.Connection, item_id: int) -> GalleryItem | None:
        row = conn.execute(sa.select(images).where(images.c.id == item_id)).first()
        return None if row is None else self._items(conn, [row])[0]

    def get(self, item_id: int) -> GalleryItem | None:
        """The item with this id, or ``None`` if there is none."""
        item_id = _item_id(item_id)
        with self._db().connect() as conn:
            return self._get(conn, item_id)

    def _require(self, conn: sa.Connection, item_id: int) -> GalleryItem:
        item = self._get(conn, item_id)
        if item is None:
            raise ItemNotFound(f"There is no image with id {item_id} in the gallery.")
        return item

    def add_evaluation(
        self, settings: dict, results: dict, figure_ids: Sequence[int] = (), duration_s: float = 0.0
    ) -> Evaluation:
        """Store one evaluation run's settings and numbers (figures are gallery items already)."""
        created = datetime.now(UTC)
        row = {
            "created_at": _to_us("creation", created),
            "settings": json.dumps(settings, allow_nan=False),
            "results": json.dumps(results, allow_nan=False),
            "figure_ids": json.dumps([int(i) for i in figure_ids]),
            "duration_s": float(duration_s),
        }
        with self._writer() as conn:
            transaction = conn.begin()
            new_id = conn.execute(sa.insert(evaluations).values(**row)).inserted_primary_key[0]
            self._commit(transaction)
        return Evaluation(
            new_id, created, settings, results, tuple(int(i) for i in figure_ids), float(duration_s)
        )

    def evaluations(self, limit: int = 50) -> list[Evaluation]:
        """The latest evaluation runs, newest first."""
        query = (
            sa.select(evaluations)
            .order_by(evaluations.c.id.desc())
            .limit(max(1, min(int(limit), MAX_PAGE_SIZE)))
        )
        with self._db().connect() as conn:
            return [_evaluation(r) for r in conn.execute(query)]

    def evaluation(self, evaluation_id: int) -> Evaluation:
        """One evaluation run by its id."""
        evaluation_id = _item_id(evaluation_id)
        with self._db().connect() as conn:
            row = conn.execute(sa.select(evaluations).where(evaluations.c.id == evaluation_id)).first()
        if row is None:
            raise ItemNotFound(f"There is no evaluation #{evaluation_id}.")
        return _evaluation(row)

    def count(self) -> int:
        with self._db().connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(images)).scalar_one()

    def _distinct(self, column: str) -> list[str]:
        # Skip-scan over the (column, created_at) index: one seek per distinct value.
        assert column in ("model", "technique")
        sql = (
            f"WITH RECURSIVE v(x) AS (SELECT min({column}) FROM images UNION ALL "
            f"SELECT (SELECT min({column}) FROM images WHERE {column} > v.x) FROM v WHERE v.x IS NOT NULL) "
            "SELECT x FROM v WHERE x IS NOT NULL"
        )
        with self._db().connect() as conn:
            return list(conn.execute(sa.text(sql)).scalars())

    def models(self) -> list[str]:
        return self._distinct("model")

    def techniques(self) -> list[str]:
        return self._distinct("technique")

    def search(
        self,
        query: str = "",
        *,
        model: str | None = None,
        technique: str | None = None,
        favourite: bool | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        tag: str | None = None,
        page: int = 0,
        page_size: int = 24,
    ) -> Page:
        """Newest-first page of items whose prompt or negative prompt contains all the words.

        ``since`` is inclusive, ``until`` exclusive (naive datetimes are UTC); ``page`` is 0-based.
        """
        if query is None:
            query = ""
        if not isinstance(query, str):
            raise InvalidValue(f"The search text must be text, not {type(query).__name__}.")
        query = query[:MAX_QUERY_CHARS].encode("utf-8", "replace").decode("utf-8")
        page = _int("page number", page, 0, 10_000_000)
        page_size = _int("page size", page_size, 1, MAX_PAGE_SIZE)
        conditions: list[sa.ColumnElement[bool]] = []
        if model is not None:
            conditions.append(images.c.model == _text("model filter", model, 256))
        if technique is not None:
            conditions.append(images.c.technique == _text("technique filter", technique, 64))
        if favourite is not None:
            if not isinstance(favourite, bool):
                raise InvalidValue("The favourite filter must be True, False or None.")
            conditions.append(images.c.favourite == favourite)
        if (since_us := _to_us("'since'", since)) is not None:
            conditions.append(images.c.created_at >= since_us)
        if (until_us := _to_us("'until'", until)) is not None:
            conditions.append(images.c.created_at < until_us)
        if tag is not None:
            conditions.append(
                images.c.id.in_(
                    sa.select(image_tags.c.image_id).where(image_tags.c.tag == _text("tag", tag, 64))
                )
            )
        match = fts_query(query)
        with self._db().connect() as conn:
            fts_total: int | None = None
            if match is not None:
                fts_match = sa.literal_column("images_fts").op("MATCH")(match)
                fts_total = conn.execute(
                    sa.select(sa.func.count()).select_from(_images_fts).where(fts_match)
                ).scalar_one()
                if fts_total == 0:
                    return Page(items=(), total=0, page=page, page_size=page_size)
                # Many matches: walk the created_at index and probe the match set (``id + 0`` stops
                # SQLite from driving the query by rowid, which would sort every match).
                # Few matches: look them up by rowid and sort them.
                many = fts_total > _FTS_SCAN_THRESHOLD
                id_expr = images.c.id + sa.literal_column("0") if many else images.c.id
                matching = sa.select(_images_fts.c.rowid).where(fts_match)
                where = sa.and_(sa.true(), *conditions, id_expr.in_(matching))
            else:
                where = sa.and_(sa.true(), *conditions)
            if fts_total is not None and not conditions:
                total = fts_total  # the external-content index mirrors the table (triggers)
            else:
                total = conn.execute(sa.select(sa.func.count()).select_from(images).where(where)).scalar_one()
            rows = conn.execute(
                sa.select(images)
                .where(where)
                .order_by(images.c.created_at.desc(), images.c.id.desc())
                .limit(page_size)
                .offset(page * page_size)
            ).all()
            items = self._items(conn, rows)
        return Page(items=tuple(items), total=total, page=page, page_size=page_size)

    def lineage(self, item_id: int) -> tuple[list[GalleryItem], list[GalleryItem]]:
        """``(ancestors oldest-first, direct children oldest-first)`` of an item."""
        item_id = _item_id(item_id)
        with self._db().connect() as conn:
            self._require(conn, item_id)
            chain = conn.execute(
                sa.text(
                    "WITH RECURSIVE anc(id, depth) AS ("
                    " SELECT parent_id, 1 FROM images WHERE id = :id AND parent_id IS NOT NULL"
                    " UNION ALL"
                    " SELECT images.parent_id, anc.depth + 1 FROM images JOIN anc ON images.id = anc.id"
                    " WHERE images.parent_id IS NOT NULL AND anc.depth < 10000"
                    ") SELECT id, depth FROM anc"
                ),
                {"id": item_id},
            ).all()
            depth = {row.id: row.depth for row in chain}
            ancestor_rows = conn.execute(sa.select(images).where(images.c.id.in_(list(depth)))).all()
            ancestor_rows = sorted(ancestor_rows, key=lambda r: -depth[r.id])
            child_rows = conn.execute(
                sa.select(images)
                .where(images.c.parent_id == item_id)
                .order_by(images.c.created_at, images.c.id)
            ).all()
            return self._items(conn, ancestor_rows), self._items(conn, child_rows)

    # -- writing ------------------------------------------------------------------------------

    def add(
        self,
        image: Image.Image,
        *,
        technique: str,
        model: str,
        prompt: str,
        negative_prompt: str = "",
        seed: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        width: int | None = None,
        height: int | None = None,
        scheduler: str | None = None,
        settings: dict[str, Any] | None = None,
        infotext: str | None = None,
        parent_id: int | None = None,
        duration_s: float = 0.0,
        tags: Iterable[str] = (),
    ) -> GalleryItem:
        """Store a generated image (as PNG with metadata) and its row; returns the new item.

        ``width``/``height`` default to the image size, ``infotext`` to one built from the fields.
        """
        if not isinstance(image, Image.Image):
            raise InvalidValue("The image must be a PIL image.")
        if image.width * image.height > pngmeta.MAX_PIXELS:
            raise InvalidValue(f"The image is too large ({image.width}x{image.height}).")
        settings = {} if settings is None else settings
        created = datetime.now(UTC)
        row: dict[str, Any] = {
            "technique": _text("technique", technique, 64, required=True).strip(),
            "model": _text("model name", model, 256),
            "prompt": _text("prompt", prompt, MAX_PROMPT_CHARS),
            "negative_prompt": _text("negative prompt", negative_prompt, MAX_PROMPT_CHARS),
            "seed": _opt_int("seed", seed, *_INT64),
            "steps": _opt_int("step count", steps, 0, 10_000),
            "guidance": _opt_float("guidance scale", guidance, -1e4, 1e4),
            "width": _int("width", image.width if width is None else width, 1, 65_535),
            "height": _int("height", image.height if height is None else height, 1, 65_535),
            "scheduler": _opt_text("scheduler", scheduler, 128),
            "settings": _settings_json(settings),
            "parent_id": None if parent_id is None else _item_id(parent_id),
            "duration_s": _opt_float("duration", duration_s, 0.0, 1e9) or 0.0,
            "created_at": _to_us("creation", created),
            "favourite": False,
        }
        tag_list = _tags(tags)
        if infotext is None:
            infotext = pngmeta.format_infotext(row["prompt"], row["negative_prompt"], _a1111_params(row))
        _text("infotext", infotext, pngmeta.MAX_INFOTEXT_BYTES)
        if len(infotext.encode("utf-8")) > pngmeta.MAX_INFOTEXT_BYTES:
            raise InvalidValue(f"The infotext is longer than {pngmeta.MAX_INFOTEXT_BYTES // 1024} KiB.")

        self._db()
        name = f"{created:%Y%m%d-%H%M%S}-{secrets.token_hex(6)}.png"  # never from user text
        final = self.image_dir / name
        staging = self.image_dir / f"{TEMP_PREFIX}{name}"
        renamed = False
        with self._file_lock(exclusive=False):
            try:
                try:
                    row["sha256"] = pngmeta.write_png(staging, image, infotext, settings)
                except ValueError as exc:
                    raise InvalidValue(str(exc)) from None
                row["image_path"] = name
                with self._writer() as conn:
                    transaction = conn.begin()
                    try:
                        if (
                            row["parent_id"] is not None
                            and not conn.execute(
                                sa.select(images.c.id).where(images.c.id == row["parent_id"])
                            ).first()
                        ):
                            raise ItemNotFound(f"The parent image {row['parent_id']} is not in the gallery.")
                        new_id = conn.execute(images.insert().values(**row)).inserted_primary_key[0]
                        if tag_list:
                            conn.execute(
                                image_tags.insert(), [{"image_id": new_id, "tag": t} for t in tag_list]
                            )
                        os.replace(staging, final)
                        renamed = True
                        _fsync_dir(self.image_dir)
                        self._commit(transaction)
                    except BaseException:
                        if transaction.is_active:
                            with contextlib.suppress(Exception):
                                transaction.rollback()
                        raise
            except BaseException:
                _unlink(staging)
                if renamed:
                    _unlink(final)
                raise
        return self._item(_RowView(id=new_id, **row), tag_list)

    def set_favourite(self, item_id: int, favourite: bool) -> GalleryItem:
        item_id = _item_id(item_id)
        if not isinstance(favourite, bool):
            raise InvalidValue("Favourite must be True or False.")
        with self._writer() as conn, conn.begin():
            result = conn.execute(images.update().where(images.c.id == item_id).values(favourite=favourite))
            if result.rowcount == 0:
                raise ItemNotFound(f"There is no image with id {item_id} in the gallery.")
            return self._require(conn, item_id)

    def set_tags(self, item_id: int, tags: Iterable[str]) -> GalleryItem:
        item_id = _item_id(item_id)
        tag_list = _tags(tags)
        with self._writer() as conn, conn.begin():
            self._require(conn, item_id)
            conn.execute(image_tags.delete().where(image_tags.c.image_id == item_id))
            if tag_list:
                conn.execute(image_tags.insert(), [{"image_id": item_id, "tag": t} for t in tag_list])
            return self._require(conn, item_id)

    def delete(self, item_id: int) -> None:
        """Delete an item's row and file together; its children keep existing (parent_id NULL)."""
        item_id = _item_id(item_id)
        self._db()
        with self._file_lock(exclusive=False), self._writer() as conn:
            transaction = conn.begin()
            moved = False
            try:
                path = conn.execute(sa.select(images.c.image_path).where(images.c.id == item_id)).scalar()
                if path is None:
                    raise ItemNotFound(f"There is no image with id {item_id} in the gallery.")
                final = self.image_dir / path
                trash = self.image_dir / f"{TEMP_PREFIX}del-{path}"
                try:
                    os.replace(final, trash)
                    moved = True
                except FileNotFoundError:
                    pass
                conn.execute(images.delete().where(images.c.id == item_id))
                self._commit(transaction)
            except BaseException:
                if transaction.is_active:
                    with contextlib.suppress(Exception):
                        transaction.rollback()
                if moved:
                    os.replace(trash, final)
                raise
        if moved:
            _unlink(trash)

    def import_png(self, path: str | os.PathLike[str]) -> GalleryItem:
        """Import a PNG written by AUTOMATIC1111 (``parameters``) or by us (``latent_studio``)."""
        try:
            image, meta = pngmeta.open_png(path)
        except ValueError as exc:
            raise ImageRejected(str(exc)) from None
        try:
            if meta.infotext is None and meta.settings is None:
                raise ImageRejected("The PNG has no generation parameters to import.")
            parsed: dict[str, Any] = {}
            if meta.infotext is not None:
                try:
                    parsed = pngmeta.parse_infotext(meta.infotext)
                except ValueError as exc:
                    if meta.settings is None:
                        raise ImageRejected(f"The PNG's generation parameters can't be read: {exc}") from None
            fields = _fields_from_infotext(parsed, image)
            if meta.settings is not None:
                settings = dict(meta.settings)
                for key in fields:
                    if key in settings and key != "technique":
                        fields[key] = settings[key]
                technique = settings.get("technique")
                if not isinstance(technique, str) or not technique.strip() or len(technique) > 64:
                    technique = "import"
            else:
                settings = {"technique": "txt2img", **fields}
                technique = "import"
            return self.add(
                image,
                technique=technique,
                infotext=meta.infotext if meta.infotext is not None and parsed else None,
                settings=settings,
                **fields,
            )
        except InvalidValue as exc:
            raise ImageRejected(f"The PNG's generation parameters are invalid: {exc}") from None
        finally:
            image.close()

    # -- maintenance --------------------------------------------------------------------------

    def reconcile(self) -> ReconcileReport:
        """Remove temp files and files without a row, and rows whose file is gone.

        If more than half of the rows (and more than 10) have lost their files, those rows are
        kept and counted in ``missing_rows_kept`` -- that looks like a wrong or unmounted image
        folder rather than deleted files.
        """
        self._db()
        return self._reconcile()

    def _reconcile(self) -> ReconcileReport:
        assert self._engine is not None
        with self._file_lock(exclusive=True), self._write_lock:
            temps: list[str] = []
            pngs: set[str] = set()
            with os.scandir(self.image_dir) as entries:
                for entry in entries:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    if entry.name.startswith(TEMP_PREFIX):
                        temps.append(entry.name)
                    elif entry.name.endswith(".png") and not entry.name.startswith("."):
                        pngs.add(entry.name)
            removed_rows = kept_rows = 0
            with self._engine.connect() as conn:
                conn.execution_options(sqlite_immediate=True)
                with conn.begin():
                    rows = conn.execute(sa.select(images.c.id, images.c.image_path)).all()
                    known = {r.image_path for r in rows}
                    missing = [r.id for r in rows if r.image_path not in pngs]
                    if missing and len(missing) > max(10, len(rows) // 2):
                        kept_rows = len(missing)
                    else:
                        for start in range(0, len(missing), 500):
                            chunk = missing[start : start + 500]
                            conn.execute(images.delete().where(images.c.id.in_(chunk)))
                        removed_rows = len(missing)
            orphans = sum(_unlink(self.image_dir / name) for name in pngs - known)
            temp_removed = sum(_unlink(self.image_dir / name) for name in temps)
        return ReconcileReport(
            temp_files_removed=temp_removed,
            orphan_files_removed=orphans,
            missing_rows_removed=removed_rows,
            missing_rows_kept=kept_rows,
        )

    def _bulk_insert_rows(self, rows: Sequence[dict[str, Any]]) -> None:
        """Insert raw rows in one transaction, without files (benchmark seeding only).

        Goes through the same table and FTS triggers as :meth:`add`. Keys are the ``images``
        columns; ``settings`` must already be a JSON string.
        """
        with self._writer() as conn, conn.begin():
            conn.execute(images.insert(), list(rows))


class _RowView:
    """Attribute access over a dict, so :meth:`Gallery._item` can build items without a re-read."""

    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)


def _evaluation(row: sa.Row[Any]) -> Evaluation:
    return Evaluation(
        row.id,
        _from_us(row.created_at),
        json.loads(row.settings),
        json.loads(row.results),
        tuple(json.loads(row.figure_ids)),
        row.duration_s,
    )


def _a1111_params(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "Steps": row["steps"],
        "Sampler": row["scheduler"],
        "CFG scale": row["guidance"],
        "Seed": row["seed"],
        "Size": f"{row['width']}x{row['height']}",
        "Model": row["model"] or None,
    }


def _fields_from_infotext(parsed: dict[str, Any], image: Image.Image) -> dict[str, Any]:
    """Map a parsed A1111 infotext onto :meth:`Gallery.add` keyword arguments."""
    model = parsed.get("Model") or parsed.get("Model hash") or ""
    return {
        "prompt": parsed.get("prompt", ""),
        "negative_prompt": parsed.get("negative_prompt", ""),
        "seed": parsed.get("Seed"),
        "steps": parsed.get("Steps"),
        "guidance": parsed.get("CFG scale"),
        "width": parsed.get("width", image.width),
        "height": parsed.get("height", image.height),
        "scheduler": parsed.get("Sampler"),
        "model": model,
    }
