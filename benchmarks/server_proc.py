"""A real teacher server in its own process, as in production: the benchmark process is only its client.

Parent side: `ServerProcess(...)` creates the ledger and an API key, starts `python -m benchmarks.server_proc`, and
waits for the port it prints. Child side: `main()` runs `teacher_server.server.TeacherServer` (the same class the
`teacher-server serve` CLI runs) with the given settings and torch thread count until SIGTERM.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.timing import REPO
from teacher_server.launcher import stop_gracefully


class ServerProcess:
    """Start with `start()`, then `wait_ready()`; `address`, `api_key`; `stop()` (idempotent)."""

    def __init__(self, name: str, settings: dict[str, Any], workdir: Path, *, threads: int) -> None:
        from teacher_server.ledger.database import open_ledger
        from teacher_server.ledger.keys import create_api_key

        self.name = name
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        db = f"sqlite:///{workdir / 'ledger.db'}"
        sessions = open_ledger(db)
        self.api_key, _ = create_api_key(sessions, name=f"bench-{name}")
        sessions.kw["bind"].dispose()
        self.settings = {"host": "127.0.0.1", "port": 0, "metrics_port": None, "db": db, **settings}
        self.threads = threads
        self.port: int | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._log = workdir / "server.log"

    def start(self) -> ServerProcess:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        cmd = [sys.executable, "-m", "benchmarks.server_proc", "--settings", json.dumps(self.settings),
               "--threads", str(self.threads)]
        self._proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=self._log.open("w"), text=True)
        return self

    def wait_ready(self, timeout_s: float = 300.0) -> ServerProcess:
        """Block until the child printed its port (raises with the child's log on failure)."""
        if self.port is not None:
            return self
        assert self._proc is not None and self._proc.stdout is not None, "start() first"
        deadline = time.monotonic() + timeout_s
        line = ""
        while time.monotonic() < deadline:
            line = self._proc.stdout.readline()
            if line.startswith("{"):
                self.port = int(json.loads(line)["port"])
                return self
            if not line and self._proc.poll() is not None:
                break
        tail = self._log.read_text()[-2000:] if self._log.exists() else ""
        self.stop()
        raise RuntimeError(f"teacher server {self.name!r} did not start: {line.strip()} {tail}")

    @property
    def address(self) -> str:
        assert self.port is not None, "wait_ready() first"
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        stop_gracefully(proc, timeout_s=30)
        if proc.stdout is not None:
            proc.stdout.close()


class ServerPool:
    """One server process per teacher model, started together (they load in parallel) and shared by sections."""

    def __init__(self, workdir: Path, *, threads: int) -> None:
        self.workdir = workdir
        self.threads = threads
        self._servers: dict[str, ServerProcess] = {}

    def launch(self, key: str, settings: dict[str, Any]) -> None:
        if key not in self._servers:
            self._servers[key] = ServerProcess(key, settings, self.workdir / key, threads=self.threads).start()

    def get(self, key: str) -> ServerProcess:
        return self._servers[key].wait_ready()

    def close(self) -> None:
        for server in self._servers.values():
            server.stop()
        self._servers.clear()

    def __enter__(self) -> ServerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------- child side

async def _serve(settings: Any) -> None:
    from teacher_server.service.server import TeacherServer

    server = TeacherServer(settings)
    await server.start()
    print(json.dumps({"port": server.port}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=2.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="benchmark helper: one teacher server process")
    parser.add_argument("--settings", required=True, help="ServerSettings fields as JSON")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args(argv)
    import torch

    from teacher_server.settings import ServerSettings

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    asyncio.run(_serve(ServerSettings(**json.loads(args.settings))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
