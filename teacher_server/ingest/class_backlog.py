"""What each ingest worker holds for the teacher, per priority class, where the device process can read it.

A worker's fair queue serves its priority classes strictly (engine/scheduler.py), but a worker has one call at the
device at a time. Were the device to run the calls in arrival order, one worker's `batch`-class call would run while
another worker's `interactive` requests wait, and a key's class would hold only on the worker its connection
reached. So the device runs the best class first among the calls waiting there, and holds a call back for a short
while when a worker with no call at the device holds requests of a better class (device_process.py): that worker's
next call comes within a few milliseconds of its last reply.

Counted with counters that only grow, so that no moment reads wrong: per worker and class, the requests the worker
took in and those it let go without sending them to the device (dropped in its queue, their caller gone, cut as their
forward started, or a send that failed), both written by the worker; and the requests the device received, counted by
the device after it queued their call. What the worker holds (queued, or in a batch formed but not yet sent: a worker
forms its next batch while its current one runs) is the first less the other two. A request in flight from the worker
to the device is held until the device has its call, never neither. One aligned 64-bit word per counter: a read sees
the value before or after a write.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from multiprocessing.context import BaseContext
from typing import Any

from teacher_server.priorities import PRIORITIES

CLASSES = len(PRIORITIES)


class ClassBacklog:
    """Per ingest worker and priority class: the requests taken in and let go by the worker. Made by the supervisor
    (pass it to the processes as an argument); the workers write through `writer`, the device reads through
    `reader`."""

    def __init__(self, context: BaseContext, workers: int) -> None:
        self._taken: Any = context.RawArray("q", workers * CLASSES)  # [worker * CLASSES + rank]
        self._let_go: Any = context.RawArray("q", workers * CLASSES)
        self.workers = workers

    def writer(self, worker: int) -> WorkerBacklog:
        """What worker `worker`'s batcher counts into."""
        if not 0 <= worker < self.workers:
            raise ValueError(f"worker {worker} of {self.workers}")
        return WorkerBacklog(self, worker)

    def reader(self) -> DeviceBacklog:
        """The device's view: what each worker holds, less what the device received."""
        return DeviceBacklog(self)

    def kept(self, worker: int) -> tuple[int, ...]:
        """Per class: requests worker `worker` took in and did not let go (held, or sent to the device)."""
        base = worker * CLASSES
        let_go = [self._let_go[base + r] for r in range(CLASSES)]  # first: a take read later only adds
        return tuple(self._taken[base + r] - let_go[r] for r in range(CLASSES))


class WorkerBacklog:
    """One worker's counters. Its event loop and its forward thread both write them (the lock); nothing else does."""

    def __init__(self, backlog: ClassBacklog, worker: int) -> None:
        self._backlog = backlog
        self._base = worker * CLASSES
        self._lock = threading.Lock()

    def taken(self, rank: int) -> None:
        """A request of class `rank` was queued."""
        with self._lock:
            self._backlog._taken[self._base + rank] += 1

    def let_go(self, ranks: Iterable[int]) -> None:
        """Requests of these classes leave the worker without being sent to the device."""
        with self._lock:
            for rank in ranks:
                self._backlog._let_go[self._base + rank] += 1


class DeviceBacklog:
    """The device process's view. `received` from each worker's socket thread, after its call is queued at the
    device; the rest from the forward thread, which takes `snapshot` before it looks at the calls queued: a call
    received after it is then either among those calls or still held in the worker's counts."""

    def __init__(self, backlog: ClassBacklog) -> None:
        self._backlog = backlog
        self._received = [[0] * CLASSES for _ in range(backlog.workers)]  # per worker: written by its thread only

    def received(self, worker: int, ranks: Iterable[int]) -> None:
        counts = self._received[worker]
        for rank in ranks:
            counts[rank] += 1

    def snapshot(self) -> list[tuple[int, ...]]:
        """What the device has received so far, per worker and class."""
        return [tuple(counts) for counts in self._received]

    def best_rank(self, worker: int, received: list[tuple[int, ...]]) -> int | None:
        """The best class (priorities.rank_of) worker `worker` holds requests of, beyond `received` (a snapshot);
        None when it holds none."""
        kept = self._backlog.kept(worker)
        return next((rank for rank in range(CLASSES) if kept[rank] - received[worker][rank] > 0), None)
