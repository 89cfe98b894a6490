"""A throw-away PostgreSQL server for tests: Debian's binaries (`apt-get install -y postgresql`), `initdb` into a
fresh directory, `pg_ctl start` on a free port of 127.0.0.1 (unix socket in that directory), one new database per
test, stopped and deleted at the end of the session.

Not a conftest.py (`tests/conftest.py` is the one conftest module). Import the fixtures into a test module:

    from postgres_testkit import pg_rows, postgres_server, postgres_url  # noqa: F401 (fixtures)

When the binaries are missing the tests skip with the reason, except in CI (env CI=true), where they fail:
`make test` installs the package when it runs as root, so CI always runs them.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"
BIN_GLOB = "/usr/lib/postgresql/*/bin"  # Debian's layout: one directory per major version
SERVER_TIMEZONE = "Asia/Kolkata"  # UTC+05:30: the ledger must not depend on the server's zone
SUPERUSER = "postgres"
START_ATTEMPTS = 3  # a free port can be taken between probing and binding


def find_bin_dir() -> Path | None:
    """Directory with initdb/pg_ctl/postgres: the newest Debian install, else the one on PATH."""
    versions = sorted(Path("/").glob(BIN_GLOB.lstrip("/")), key=lambda p: _major(p.parent.name))
    for candidate in reversed(versions):
        if (candidate / "initdb").is_file() and (candidate / "pg_ctl").is_file():
            return candidate
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).parent
    return None


def _major(text: str) -> int:
    return int(text) if text.isdigit() else -1


def _unavailable(reason: str) -> None:
    """Fail in CI (the tests must run there), skip elsewhere."""
    if IN_CI:
        pytest.fail(
            f"{reason}; CI must run the Postgres tests: `make test` installs Debian's postgresql "
            "(apt-get install -y postgresql) when it runs as root",
            pytrace=False,
        )
    pytest.skip(f"{reason} (apt-get install -y postgresql); CI installs it and runs these tests")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PostgresServer:
    """A running throw-away cluster; trust authentication on 127.0.0.1 only."""

    bin_dir: Path
    root: Path  # owned by the server's OS user: data/, the socket and the log
    port: int
    run_as: str | None  # OS user the binaries run as (None: the current user, when not root)
    _databases: itertools.count[int]

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        return self.root / "server.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg2://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres") -> Any:
        """A raw psycopg2 connection (no SQLAlchemy): the tests' independent view of the database."""
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, user=SUPERUSER, dbname=database, connect_timeout=10)

    def create_database(self, prefix: str = "ledger") -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        name = f"{prefix}_{next(self._databases)}"
        conn = self.connect()
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.url(name)

    def start(self, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        """pg_ctl start on the data directory and `port` (again after `stop`: what a database restart looks like to
        the clients)."""
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root} "
            f"-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=100 "
            f"-c timezone={SERVER_TIMEZONE}"
        )
        argv = ["start", "-D", str(self.data_dir), "-w", "-t", "60", "-l", str(self.log_file), "-o", options]
        return _run(self, [str(self.bin_dir / "pg_ctl"), *argv], check=check)

    def stop(self, mode: str = "immediate", *, check: bool = False) -> None:
        """pg_ctl stop: `immediate` by default (with synchronous_commit=off it may lose the last commits; `fast` shuts
        down cleanly)."""
        _run(self, [str(self.bin_dir / "pg_ctl"), "stop", "-D", str(self.data_dir), "-m", mode, "-w"], check=check)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"


def _run(server: PostgresServer, argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    prefix = ["runuser", "-u", server.run_as, "--"] if server.run_as else []
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}  # no stray PGPORT/PGDATA/...
    done = subprocess.run([*prefix, *argv], cwd=server.root, env=env, capture_output=True, text=True, timeout=120)
    if check and done.returncode != 0:
        raise RuntimeError(f"{Path(argv[0]).name} failed ({done.returncode}): {done.stderr.strip() or done.stdout}")
    return done


def start_postgres(bin_dir: Path, *, run_as: str | None) -> PostgresServer:
    """initdb + pg_ctl start in a new directory under the system tmp dir (the server's user must reach it, so not
    under pytest's per-user tmp root)."""
    root = Path(tempfile.mkdtemp(prefix="maskedkd-pg-"))
    server = PostgresServer(bin_dir=bin_dir, root=root, port=0, run_as=run_as, _databases=itertools.count())
    try:
        if run_as:
            entry = pwd.getpwnam(run_as)
            os.chown(root, entry.pw_uid, entry.pw_gid)
        _run(
            server,
            [
                str(bin_dir / "initdb"),
                "-D",
                str(server.data_dir),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        )
        for attempt in range(START_ATTEMPTS):
            server.port = _free_port()
            started = server.start(check=False)
            if started.returncode == 0:
                return server
            if attempt == START_ATTEMPTS - 1:
                raise RuntimeError(f"pg_ctl start failed: {started.stderr.strip()}\n{server.log_tail()}")
    except BaseException:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
        raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throw-away PostgreSQL server for the whole session (skips, or fails in CI, without the binaries)."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        _unavailable(f"PostgreSQL server binaries not found (looked in {BIN_GLOB} and on PATH)")
    assert bin_dir is not None
    run_as: str | None = None
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        try:
            pwd.getpwnam(SUPERUSER)
        except KeyError:
            _unavailable(f"running as root and there is no {SUPERUSER!r} OS user to run the server as")
        run_as = SUPERUSER
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        _unavailable("psycopg2 is not installed (pip install -e '.[test]')")
    server = start_postgres(bin_dir, run_as=run_as)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """`postgresql+psycopg2://...` of a new, empty database of the session's server (one per test)."""
    return postgres_server.create_database()


def pg_rows(url: str, query: str, params: Sequence[Any] = (), *, commit: bool = False) -> list[tuple[Any, ...]]:
    """Raw SQL through psycopg2 alone (the tests' reference, independent of the ledger's SQLAlchemy code); rows of
    the result (none for a statement without one), committed when `commit`."""
    import psycopg2
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    conn = psycopg2.connect(
        host=parsed.host, port=parsed.port, user=parsed.username, dbname=parsed.database, connect_timeout=10
    )
    try:
        with conn.cursor() as cur:
            cur.execute(query, tuple(params) or None)  # no params: a literal % stays a %
            result = list(cur.fetchall()) if cur.description is not None else []
        if commit:
            conn.commit()
        return result
    finally:
        conn.close()
