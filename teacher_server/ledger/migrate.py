"""Ledger schema migrations with Alembic: bring any ledger (empty, written by main before migrations existed, or an
older revision) to the newest revision. The scripts ship inside the package (teacher_server/ledger/migrations), so no
alembic.ini is needed in the working directory."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Alembic logs its plugins and each step at INFO: noise in a server's start-up log; the ledger says in one line
# of its own what a migration did.
logging.getLogger("alembic").setLevel(logging.WARNING)

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
PRE_ALEMBIC_REVISION = "0001"  # the schema main created with create_all before migrations existed
SCHEMA_LOCK_ID = 0x6D6B645F6C6467  # Postgres advisory lock key ("mkd_ldg") serializing migrations
_IN_PROCESS = threading.Lock()  # alembic's `context` is process-global: one migration at a time per process


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(connection: Connection) -> str | None:
    """The ledger's revision; PRE_ALEMBIC_REVISION for a ledger of main from before migrations; None when empty."""
    revision = MigrationContext.configure(connection).get_current_revision()
    if revision is None and inspect(connection).has_table("api_keys"):
        return PRE_ALEMBIC_REVISION
    return revision


@contextmanager
def _locked_transaction(engine: Engine) -> Iterator[Connection]:
    """One transaction around the whole migration, DDL included, that processes starting together take in turn:
    Postgres by an advisory lock held to the commit; SQLite by BEGIN IMMEDIATE (its write lock; the driver's own
    transaction handling would autocommit each CREATE/ALTER)."""
    if engine.dialect.name != "sqlite":
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": SCHEMA_LOCK_ID})
            yield conn
        return
    with engine.connect() as conn:
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        level = dbapi.isolation_level
        dbapi.isolation_level = None
        try:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.exec_driver_sql("ROLLBACK")
                raise
            conn.exec_driver_sql("COMMIT")
        finally:
            dbapi.isolation_level = level


def upgrade_to_head(engine: Engine) -> tuple[str | None, str] | None:
    """Migrate the ledger to the newest revision in one transaction; returns (from, to) when it migrated, None when
    it already was there. Processes starting together (server replicas, dashboard, CLI) migrate in turn: the first
    migrates, the others then find the newest revision."""
    head = head_revision()
    with _IN_PROCESS, _locked_transaction(engine) as conn:
        before = current_revision(conn)
        if before == head:
            return None
        config = alembic_config(conn)
        if before == PRE_ALEMBIC_REVISION and MigrationContext.configure(conn).get_current_revision() is None:
            command.stamp(config, PRE_ALEMBIC_REVISION)
        command.upgrade(config, "head")
    log.info("ledger: upgraded schema from %s to %s", before or "empty", head)
    return before, head
