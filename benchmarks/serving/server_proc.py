"""A real teacher server in its own process, as in production: the benchmark process is only its client.

`BenchServer(...)` creates the ledger and an API key, and starts `teacher-server serve` with the given settings (the
fields of `teacher_server.settings.ServerSettings`) and torch thread count through `teacher_server.launcher`;
`ServerPool` starts one per teacher model, all at once, so they load in parallel.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from benchmarks.timing import REPO
from teacher_server.launcher import ServerProcess, serve_argv, settings_flags


class BenchServer:
    """Start with `start()`, then `wait_ready()`; `address`, `api_key`; `stop()` (idempotent)."""

    def __init__(self, name: str, settings: dict[str, Any], workdir: Path, *, threads: int) -> None:
        from teacher_server.ledger.database import open_ledger
        from teacher_server.ledger.keys import create_api_key

        self.name = name
        workdir.mkdir(parents=True, exist_ok=True)
        db = f"sqlite:///{workdir / 'ledger.db'}"
        sessions = open_ledger(db)
        self.api_key, _ = create_api_key(sessions, name=f"bench-{name}")
        sessions.kw["bind"].dispose()
        self.settings = {"host": "127.0.0.1", "port": 0, "metrics_port": None, "db": db, "grace_s": 2.0, **settings}
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(  # the child runs this checkout's code
                [str(REPO), os.environ.get("PYTHONPATH", "")]
            ).rstrip(os.pathsep),
        )
        if threads > 0:  # torch intra-op threads of the server; 0: torch's default
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        self.process = ServerProcess(
            serve_argv(*settings_flags(self.settings)),
            log=workdir / "server.log",
            env=env,
            cwd=REPO,
            name=f"teacher server {name!r}",
        )

    def start(self) -> BenchServer:
        self.process.launch()
        return self

    def wait_ready(self, timeout_s: float = 300.0) -> BenchServer:
        """Block until the child serves (LaunchError with the child's log on failure)."""
        if self.process.ready is None:
            self.process.wait_ready(timeout_s)
        return self

    @property
    def address(self) -> str:
        return self.process.address

    def stop(self) -> None:
        self.process.stop()


class ServerPool:
    """One server process per teacher model, started together (they load in parallel) and shared by sections."""

    def __init__(self, workdir: Path, *, threads: int) -> None:
        self.workdir = workdir
        self.threads = threads
        self._servers: dict[str, BenchServer] = {}

    def launch(self, key: str, settings: dict[str, Any]) -> None:
        if key not in self._servers:
            self._servers[key] = BenchServer(key, settings, self.workdir / key, threads=self.threads).start()

    def get(self, key: str) -> BenchServer:
        return self._servers[key].wait_ready()

    def close(self) -> None:
        for server in self._servers.values():
            server.stop()
        self._servers.clear()

    def __enter__(self) -> ServerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
