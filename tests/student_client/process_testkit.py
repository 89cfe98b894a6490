"""Real processes for the billing-under-failure tests: `student-client train` and `teacher-server serve` as users run
them, the request log a run writes (`--request-log`), and the SQLite ledger read back with SQL."""
from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from dtype_marks import child_env
from student_testkit import STUDENT, STUDENT_KWARGS

from teacher_server.ledger.database import open_ledger
from teacher_server.ledger.keys import create_api_key

_BIN = Path(sys.executable).parent


def tool(name: str, module: str) -> list[str]:
    script = _BIN / name
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


STUDENT_CLI = tool("student-client", "student_client.cli")
TEACHER_CLI = tool("teacher-server", "teacher_server.cli")
SERVING = re.compile(r"teacher-server: serving \S+ on (\S+)")


def clean_env(**extra: str) -> dict[str, str]:
    """A child's environment (dtype_marks.child_env) on one OpenMP thread unless `extra` says otherwise."""
    return child_env(**{"OMP_NUM_THREADS": "1", **extra})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def train_cmd(data: Path, out: Path, teacher: str, key: str, *extra: str, epochs: int = 2,
              batch_size: int = 8) -> list[str]:
    """`student-client train --local` on the tiny student, all flags at their defaults unless given."""
    return [*STUDENT_CLI, "train", "--local", "--data", str(data), "--out", str(out), "--teacher", teacher,
            "--api-key", key, "--student", STUDENT, "--student-kwargs", json.dumps(STUDENT_KWARGS),
            "--epochs", str(epochs), "--batch-size", str(batch_size), "--no-eval", "--no-progress",
            "--request-log", str(out / "requests.jsonl"), *extra]


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


class TeacherProcess:
    """`teacher-server serve --checkpoint` on a fixed loopback port with a SQLite ledger; killable and restartable."""

    def __init__(self, checkpoint: Path, db: Path, port: int, log: Path) -> None:
        self.checkpoint, self.db, self.port, self.log = checkpoint, db, port, log
        self.proc: subprocess.Popen[str] | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> None:
        cmd = [*TEACHER_CLI, "serve", "--checkpoint", str(self.checkpoint), "--host", "127.0.0.1",
               "--port", str(self.port), "--db", f"sqlite:///{self.db}", "--no-metrics", "--max-delay-ms", "1"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env=clean_env())
        self.starts += 1
        ready = threading.Event()

        def pump(proc: subprocess.Popen[str]) -> None:  # drain stderr into the log (a full pipe blocks the server)
            assert proc.stderr is not None
            with self.log.open("a") as f:
                for line in proc.stderr:
                    f.write(line)
                    f.flush()
                    if SERVING.search(line):
                        ready.set()
            ready.set()

        threading.Thread(target=pump, args=(self.proc,), daemon=True).start()
        ready.wait(timeout_s)
        assert self.proc.poll() is None, f"teacher-server did not start: {self.log.read_text()[-2000:]}"

    def kill(self) -> None:
        """SIGKILL: no drain, no graceful shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
