"""Opening a ledger: the engine (SQLite with WAL and a busy timeout, or Postgres) and its schema, migrated to the
newest revision."""
from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_S = 30.0  # writers wait this long for the SQLite write lock instead of failing at once


def make_engine(url: str, *, busy_timeout_s: float = SQLITE_BUSY_TIMEOUT_S) -> Engine:
    """An engine for `url`; SQLite files get WAL, a busy timeout and enforced foreign keys."""
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    database = url.split("///", 1)[1] if "///" in url else ""
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": busy_timeout_s, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; a crash loses at most the last commits
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return engine


def missing_sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL when that file does not exist; None when it exists or the URL names no file (memory,
    `file:` URIs, other databases). Commands that only read a ledger refuse a missing one instead of creating it."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return None
    database = parsed.database or ""
    if not parsed.get_backend_name() == "sqlite" or database in ("", ":memory:") or database.startswith("file:"):
        return None
    path = Path(database).expanduser()
    return None if path.exists() else path


def url_without_password(url: str) -> str:
    """A ledger URL as shown to the user: a Postgres password never reaches the terminal or a log."""
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
