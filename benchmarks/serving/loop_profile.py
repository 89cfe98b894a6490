"""The teacher server with its event loop profiled over a window the caller chooses.

    python -m benchmarks.serving.loop_profile OUT serve FLAGS...     # `teacher-server serve FLAGS...`, profiled

SIGUSR1 starts cProfile on the main thread (the asyncio loop: gRPC's callbacks, the servicer, decode, digest, the
shared-memory read); SIGUSR2 stops it and writes the pstats file OUT. The timer is the thread's CPU clock, so time spent
waiting (in epoll, or for the GIL) counts nothing: the figures are the loop's CPU, which is what the serving benchmark's
per-image cost sums. Python's profiler costs each call some time, so read shares, not absolute times. `python -m
benchmarks.serving.overhead --clients 2 --batch 64 --profile-loop OUT` runs its measured load inside such a window; read
the result with `python -m pstats OUT` (`sort tottime`, `stats 30`).
"""

from __future__ import annotations

import cProfile
import signal
import sys
import time
from pathlib import Path
from types import FrameType

START, STOP = signal.SIGUSR1, signal.SIGUSR2


class LoopProfile:
    """cProfile of the thread that handles the signals (Python's main thread), on between START and STOP."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self._profile: cProfile.Profile | None = None

    def install(self) -> None:
        signal.signal(START, self._start)
        signal.signal(STOP, self._stop)

    def _start(self, signum: int, frame: FrameType | None) -> None:
        self._profile = cProfile.Profile(time.thread_time)
        self._profile.enable()

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        if self._profile is None:
            return
        self._profile.disable()
        partial = self.out.with_name(self.out.name + ".part")
        self._profile.dump_stats(partial)
        partial.replace(self.out)  # whole or absent: the caller waits for the file
        self._profile = None


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m benchmarks.serving.loop_profile OUT serve FLAGS...", file=sys.stderr)
        return 2
    LoopProfile(Path(argv[0])).install()
    from teacher_server.cli.main import main as teacher_server

    return teacher_server(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
