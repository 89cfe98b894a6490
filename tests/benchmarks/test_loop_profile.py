"""`benchmarks.serving.loop_profile`: the profile covers the window between the two signals, on the main thread's CPU
clock, and is written whole when it ends (CPU; no tensors)."""

from __future__ import annotations

import os
import pstats
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.serving.loop_profile import START, STOP, LoopProfile, main

pytestmark = pytest.mark.dtype("float32")  # no tensors: the mark every test carries


@pytest.fixture
def restored_handlers() -> Iterator[None]:
    before = {sig: signal.getsignal(sig) for sig in (START, STOP)}
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)


def busy_inside_window(seconds: float) -> int:
    """Spin on this thread's CPU for `seconds`."""
    end, n = time.thread_time() + seconds, 0
    while time.thread_time() < end:
        n += 1
    return n


def sleeping_inside_window(seconds: float) -> None:
    time.sleep(seconds)


def busy_outside_window(seconds: float) -> int:
    return busy_inside_window(seconds)


def test_the_window_between_the_signals_is_profiled_by_cpu_time(tmp_path: Path, restored_handlers: None) -> None:
    out = tmp_path / "loop.prof"
    LoopProfile(out).install()
    busy_outside_window(0.05)
    os.kill(os.getpid(), START)
    busy_inside_window(0.2)
    sleeping_inside_window(0.3)
    os.kill(os.getpid(), STOP)
    assert out.exists() and not out.with_name("loop.prof.part").exists()
    stats = pstats.Stats(str(out)).stats  # type: ignore[attr-defined]
    by_name = {func[2]: row for func, row in stats.items()}  # (file, line, name) -> (cc, nc, tottime, cumtime, ...)
    assert "busy_outside_window" not in by_name
    assert by_name["busy_inside_window"][3] >= 0.15
    assert by_name["sleeping_inside_window"][3] < 0.1  # a sleep costs no CPU: waiting is not counted


def test_stop_without_start_writes_nothing(tmp_path: Path, restored_handlers: None) -> None:
    out = tmp_path / "loop.prof"
    LoopProfile(out).install()
    os.kill(os.getpid(), STOP)
    assert not out.exists()


def test_without_a_command_it_says_how_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["out.prof"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("usage: python -m benchmarks.serving.loop_profile OUT serve")
