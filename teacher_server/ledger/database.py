"""Opening a ledger: the engine (SQLite with WAL and a busy timeout, or Postgres) and its schema, migrated to the
newest revision."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from teacher_server.ledger.models import LedgerError

SQLITE_BUSY_TIMEOUT_S = 30.0  # writers wait this long for the SQLite write lock instead of failing at once
SQLITE_PAGE_SIZE = 16384  # bytes; applies only when the file is created


def make_engine(url: str, *, busy_timeout_s: float = SQLITE_BUSY_TIMEOUT_S) -> Engine:
    """An engine for `url`; SQLite files get WAL, a busy timeout and enforced foreign keys."""
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    database = url.split("///", 1)[1] if "///" in url else ""
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": busy_timeout_s, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_conn, _record) -> None:
        cursor = dbapi_conn.cursor()
        # A new ledger's pages are 16 KiB: a request's replay payload (its float32 logits, ~4 KB an image) spans 4x
        # fewer overflow pages, which halves the CPU of a batch's commit. An existing file keeps its page size.
        cursor.execute(f"PRAGMA page_size={SQLITE_PAGE_SIZE}")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; a crash loses at most the last commits
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return engine


def missing_sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL when that file does not exist; None when it exists or the URL names no file (memory,
    `file:` URIs, other databases)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return None
    database = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or database in ("", ":memory:") or database.startswith("file:"):
        return None
    path = Path(database).expanduser()
    return None if path.exists() else path


def in_memory_sqlite(url: str) -> bool:
    """True for a SQLite URL whose database lives in one process's memory (nothing another process can open)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    database = parsed.database or ""
    return parsed.get_backend_name() == "sqlite" and (database in ("", ":memory:") or "mode=memory" in database)


class MissingLedgerError(LedgerError):
    """A command that only reads a ledger was pointed at a SQLite file that does not exist."""


def require_existing_ledger(url: str) -> None:
    """MissingLedgerError when `url` names a SQLite file that does not exist: a read-only command refuses it instead
    of creating an empty ledger (a typo must not read as one, nor leave a new file behind)."""
    missing = missing_sqlite_file(url)
    if missing is not None:
        raise MissingLedgerError(
            f"no ledger at {missing} (check --db or MASKEDKD_DB; `teacher-server serve` or `keys create` starts one)"
        )


def without_password(url: str) -> str:
    """The URL as shown to the user: a Postgres password never reaches the terminal or a log."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return repr(url)


def open_ledger(url: str, *, busy_timeout_s: float = SQLITE_BUSY_TIMEOUT_S) -> sessionmaker[Session]:
    """Engine + schema (created or upgraded to the newest Alembic revision) + a session factory, in one call."""
    from teacher_server.ledger.migrate import upgrade_to_head

    engine = make_engine(url, busy_timeout_s=busy_timeout_s)
    upgrade_to_head(engine)
    return sessionmaker(engine, expire_on_commit=False)
