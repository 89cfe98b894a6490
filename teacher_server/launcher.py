"""Stopping a `teacher-server` child process (benchmarks, experiments, the demo) the way its signal handler expects."""
from __future__ import annotations

import os
import signal
import subprocess


def stop_gracefully(proc: subprocess.Popen, *, timeout_s: float, process_group: bool = False) -> None:
    """SIGTERM (the server drains: health NOT_SERVING, in-flight requests finish and are billed, the ledger is
    flushed), wait up to `timeout_s`, then SIGKILL. `process_group`: signal the child's whole group (its own
    session, e.g. `start_new_session=True`)."""
    if proc.poll() is not None:
        return

    def send(sig: int) -> None:
        if process_group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)

    send(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait()
