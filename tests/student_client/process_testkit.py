"""Real processes for the billing-under-failure tests: `student-client train` and `teacher-server serve` as users run
them, the request log a run writes (`--request-log`), and the SQLite ledger read back with SQL."""

from __future__ import annotations

import json
import socket
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Self

from dtype_marks import child_env
from student_testkit import train_flags

from student_client.command import student_client_command
from teacher_server.launcher import ServerProcess, serve_argv, settings_flags
from teacher_server.ledger.database import open_ledger
from teacher_server.ledger.keys import create_api_key

STUDENT_CLI = student_client_command()


def clean_env(**extra: str) -> dict[str, str]:
    """A child's environment (dtype_marks.child_env) on one OpenMP thread unless `extra` says otherwise."""
    return child_env(**{"OMP_NUM_THREADS": "1", **extra})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def train_cmd(
    data: Path, out: Path, teacher: str, key: str, *extra: str, epochs: int = 2, batch_size: int = 8
) -> list[str]:
    """`student-client train --local` on the tiny student, all flags at their defaults unless given."""
    log = out / "requests.jsonl"
    run = {"epochs": epochs, "batch_size": batch_size, "eval": False, "progress": False, "request_log": log}
    return [*STUDENT_CLI, *train_flags(local=True, data=data, out=out, teacher=teacher, api_key=key, **run), *extra]


def step_rows(out: Path) -> int:
    """Rows in the run's metrics_steps.csv (one per finished step; the header not counted)."""
    path = out / "metrics_steps.csv"
    if not path.is_file():
        return 0
    return max(0, len(path.read_text().splitlines()) - 1)


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.01) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(poll_s)


def request_log(out: Path) -> list[dict[str, object]]:
    path = out / "requests.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def digests_by_id(entries: list[dict[str, object]], run_id: str) -> dict[str, set[str]]:
    """{request id without its run id: the content digests sent under it}."""
    out: dict[str, set[str]] = defaultdict(set)
    for e in entries:
        rid = str(e["request_id"])
        assert rid.startswith(run_id + "-"), rid
        out[rid.removeprefix(run_id)].add(str(e["content_sha256"]))
    return dict(out)


def create_key(db: Path, name: str) -> str:
    """A new API key in the ledger of a running `teacher-server serve` (it made the schema)."""
    sessions = open_ledger(f"sqlite:///{db}")
    try:
        secret, _ = create_api_key(sessions, name=name)
    finally:
        sessions.kw["bind"].dispose()
    return secret


class TeacherProcess(ServerProcess):
    """`teacher-server serve --checkpoint` on a fixed loopback port with a SQLite ledger; killable and restartable
    (`kill()`, then `start()` again on the same port and ledger). `starts` counts the launches."""

    def __init__(self, checkpoint: Path, db: Path, port: int, log: Path) -> None:
        served = {"checkpoint": checkpoint, "host": "127.0.0.1", "port": port, "db": f"sqlite:///{db}"}
        served |= {"metrics_port": None, "max_delay_ms": 1}
        super().__init__(serve_argv(*settings_flags(served)), log=log, env=clean_env())
        self.db = db
        self.starts = 0

    def launch(self) -> Self:
        self.starts += 1
        return super().launch()
