"""The standalone dashboard as a user runs it (`python -m teacher_server.dashboard`, what `teacher-server dashboard`
runs): a child process on a free port of 127.0.0.1, and its first answer once it serves.

A plain module at the root of tests/ (next to dtype_marks.py), so that tests/teacher_server and its dashboard/ folder
both import it.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")
START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def dashboard_process(*flags: str, env: Mapping[str, str]) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """`python -m teacher_server.dashboard FLAGS --port PORT` on a free port, its stdout and stderr together in one
    pipe; yields (process, port) and terminates it at the end."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "teacher_server.dashboard", *flags, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(env),
    )
    try:
        yield process, port
    finally:
        process.terminate()
        process.wait(10)


def first_answer(process: subprocess.Popen[str], get: Callable[[], T], retry_on: type[Exception]) -> T:
    """`get()` once the process serves: tried again every 0.2 s while it raises `retry_on`, for up to a minute and
    only while the process lives (else the test fails with the process's output)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            return get()
        except retry_on:
            assert process.poll() is None and time.monotonic() < deadline, process.stdout and process.stdout.read()
            time.sleep(0.2)
