"""What each ingest worker holds for the teacher, where the device process can read it.

A worker's fair queue serves its priority classes strictly and its keys by start-time fair queuing on the clock all
workers share (engine/batching/scheduler.py, engine/batching/fair_clock.py), but a worker has one call at the device at
a time. Were the device to run the calls in arrival order, the workers would take turns: one worker's `batch`-class call
would run while another worker's `interactive` requests wait, and a key alone on one worker would get that worker's
turns whatever its share. So the device runs the calls waiting there as one fair queue would (best class, then smallest
start tag), and holds a call back for a short while when a worker with no call at the device holds requests of a better
class, or has formed a batch that goes first, or has queued a request that goes first (device_process.py): that worker's
next call comes within a few milliseconds of its last reply.

Counted with counters that only grow, so that no moment reads wrong. Per worker, written by the worker: per class,
the requests it took in and those it let go without sending them to the device (dropped in its queue, their caller
gone, cut as their forward started, or a send that failed); and the batches it formed and those it abandoned (never
sent), with the class and smallest start tag of the last one formed. Counted by the device after it queued a call:
the requests (per class) and calls it received. What the worker holds (queued, or in a batch formed but not yet
sent: a worker forms its next batch while its current one runs) is the first less the other two. A request or call
in flight from the worker to the device is held until the device has its call, never neither. One aligned 64-bit
word per counter: a read sees the value before or after a write.

A worker also says which request its fair queue would take next: its class and its key, written on each turn of its
event loop. A busy worker forms its next batch late (on a host short of CPU, after the device has chosen another
worker's call), so a formed batch alone says too late that it goes first. The device reads the key's start tag on
the shared clock when it chooses, not when the worker wrote it: a key's tag only grows, and the worker's true head
goes no later than that key's, so a stale head can make the device wait less, never for what goes after.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from multiprocessing.context import BaseContext
from typing import Any

from teacher_server.engine.batching.fair_clock import SharedFairClock
from teacher_server.priorities import PRIORITIES

CLASSES = len(PRIORITIES)
_RANK_SHIFT = 56  # a queue head in one word: its class above this bit, its key id + 1 below (0: none)


class ClassBacklog:
    """Per ingest worker: the requests taken in and let go per priority class, the batches formed and abandoned
    (with the last one's order), and the head of its queue. Made by the supervisor (pass it to the processes as an
    argument); the workers write through `writer`, the device reads through `reader`. `clock`: the workers' shared
    fair clock, where the device reads the start tags of the queue heads (without one it waits for formed batches
    only)."""

    def __init__(self, context: BaseContext, workers: int, clock: SharedFairClock | None = None) -> None:
        self._taken: Any = context.RawArray("q", workers * CLASSES)  # [worker * CLASSES + rank]
        self._let_go: Any = context.RawArray("q", workers * CLASSES)
        self._formed: Any = context.RawArray("q", workers)  # batches formed, per worker
        self._abandoned: Any = context.RawArray("q", workers)  # of those, never sent to the device
        self._formed_rank: Any = context.RawArray("q", workers)  # the last batch formed: its best class
        self._formed_tag: Any = context.RawArray("d", workers)  # and that class's smallest start tag
        self._head: Any = context.RawArray("q", workers)  # the queue's next request: class << _RANK_SHIFT | key + 1
        self.clock = clock
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

    def formed(self, worker: int) -> tuple[int, int, float]:
        """(batches worker `worker` formed and did not abandon, the last one's best class, its smallest start tag)."""
        count = self._formed[worker] - self._abandoned[worker]  # first: a batch formed later has its order written
        return count, self._formed_rank[worker], self._formed_tag[worker]

    def head(self, worker: int) -> tuple[int, int] | None:
        """(class, key id) of the request worker `worker`'s queue would take next, as it last wrote; None: empty."""
        word = self._head[worker]
        return None if word == 0 else (word >> _RANK_SHIFT, (word & ((1 << _RANK_SHIFT) - 1)) - 1)


class WorkerBacklog:
    """One worker's counters. Its event loop and its forward thread both write them (the lock); nothing else does."""

    def __init__(self, backlog: ClassBacklog, worker: int) -> None:
        self._backlog = backlog
        self._worker = worker
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

    def formed(self, rank: int, tag: float) -> None:
        """A batch was formed: its best class, and that class's smallest start tag."""
        with self._lock:
            self._backlog._formed_rank[self._worker] = rank
            self._backlog._formed_tag[self._worker] = tag
            self._backlog._formed[self._worker] += 1  # last: a reader that sees the count sees the order

    def abandoned(self) -> None:
        """A batch formed will not be sent (its callers left, or the send failed)."""
        with self._lock:
            self._backlog._abandoned[self._worker] += 1

    def queue_head(self, head: tuple[int, int] | None) -> None:
        """The request the queue would take next: (its class, its key id), or None when nothing is queued. From the
        event loop only (one word: no lock; key ids, the ledger's, stay below 2**56)."""
        self._backlog._head[self._worker] = 0 if head is None else head[0] << _RANK_SHIFT | head[1] + 1


class DeviceBacklog:
    """The device process's view. `received` from each worker's socket thread, after its call is queued at the
    device; the rest from the forward thread, which takes `snapshot` before it looks at the calls queued: a call
    received after it is then either among those calls or still held in the worker's counts."""

    def __init__(self, backlog: ClassBacklog) -> None:
        self._backlog = backlog
        # per worker, written by its socket thread only: requests received per class, then calls received
        self._received = [[0] * (CLASSES + 1) for _ in range(backlog.workers)]

    def received(self, worker: int, ranks: Iterable[int]) -> None:
        """A call of requests of these classes came from `worker`."""
        counts = self._received[worker]
        for rank in ranks:
            counts[rank] += 1
        counts[CLASSES] += 1

    def snapshot(self) -> list[tuple[int, ...]]:
        """What the device has received so far, per worker: requests per class, then calls."""
        return [tuple(counts) for counts in self._received]

    def best_rank(self, worker: int, received: list[tuple[int, ...]]) -> int | None:
        """The best class (priorities.rank_of) worker `worker` holds requests of, beyond `received` (a snapshot);
        None when it holds none."""
        kept = self._backlog.kept(worker)
        return next((rank for rank in range(CLASSES) if kept[rank] - received[worker][rank] > 0), None)

    def queued_head(self, worker: int) -> tuple[int, float] | None:
        """(class, start tag now) of the request worker `worker`'s queue would take next; None when its queue is
        empty or there is no clock to read the tag on."""
        head = self._backlog.head(worker)
        clock = self._backlog.clock
        if head is None or clock is None:
            return None
        rank, key_id = head
        return rank, clock.start_tag(key_id)

    def next_call(self, worker: int, received: list[tuple[int, ...]]) -> tuple[int, float] | None:
        """(best class, smallest start tag) of the batch worker `worker` formed and has not sent yet, beyond
        `received` (a snapshot); None when there is none."""
        count, rank, tag = self._backlog.formed(worker)
        return (rank, tag) if count - received[worker][CLASSES] > 0 else None
