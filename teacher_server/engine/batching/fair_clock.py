"""The clock of fair queuing (scheduler.py): every key's service so far, in teacher tokens per unit of its weight, and
the virtual time, the start tag of the request taken last.

A key's queued head starts at its service so far; a key that had nothing queued anywhere is first lifted to the
virtual time, so it cannot claim the turns it left unused. The queue takes heads in start-tag order. A request that
leaves the queue unrun (its deadline could not be met, its caller left) counts as served, as start-time fair
queuing's tags given at arrival count it: a key does not get to the front by sending requests that get dropped.

The clock also counts what each key has queued (images) and in memory (the bytes of its requests being read or
queued), for the queue bounds (scheduler.py, `QueueLimits`).

A clock in one process (`FairClock`) serves a lone server. `SharedFairClock` keeps the same numbers in shared memory
for the ingest workers of `serve --ingest-workers N` (ingest/supervisor.py): a key's service on one worker then
counts on every worker, so a key whose connections reach several workers gets no more of the teacher than a key on
one, and the queue bounds hold for all the workers together.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from multiprocessing.context import BaseContext
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Clock(Protocol):
    """What the fair queue asks of its clock; all of it from one thread (the batcher's event loop)."""

    def queued(self, key_id: int, images: int) -> None: ...
    def start_tag(self, key_id: int) -> float: ...
    def next_start(self, key_id: int) -> float: ...
    def take(self, key_id: int, cost: float, images: int) -> None: ...
    def drop(self, key_id: int, cost: float, images: int) -> None: ...
    def end_busy_period(self) -> None: ...
    def reserve(self, key_id: int, nbytes: int) -> bool: ...
    def release(self, key_id: int, nbytes: int, *, counted: bool) -> None: ...
    def load(self, key_id: int) -> Load: ...


@dataclass(frozen=True)
class Load:
    """What is queued and in memory now: for one key, and in all."""

    key_images: int
    key_bytes: int
    images: int
    nbytes: int


@dataclass
class _Key:
    served: float = 0.0  # finish tag of its last request taken or dropped: its service, tokens per unit of weight
    queued: int = 0  # its requests queued (in every process that shares the clock)
    images: int = 0  # their images
    nbytes: int = 0  # the bytes of its requests being read or queued


class FairClock:
    """The fair-queuing clock of one process (its batcher's event loop calls it; no locks)."""

    def __init__(self) -> None:
        self._keys: dict[int, _Key] = {}
        self._virtual = 0.0
        self._latest = 0.0  # the largest finish tag given out
        self._queued = 0
        self._images = 0
        self._nbytes = 0

    def queued(self, key_id: int, images: int) -> None:
        """A request of `key_id` with `images` was queued."""
        k = self._keys.setdefault(key_id, _Key())
        if k.queued == 0:
            k.served = max(k.served, self._virtual)
        k.queued += 1
        k.images += images
        self._queued += 1
        self._images += images

    def start_tag(self, key_id: int) -> float:
        """Where the key's queued head starts (the key has a request queued)."""
        k = self._keys.get(key_id)
        return k.served if k else self._virtual

    def next_start(self, key_id: int) -> float:
        """Where a request of `key_id` queued now would start, were nothing of the key queued."""
        k = self._keys.get(key_id)
        return self._virtual if k is None else k.served if k.queued else max(k.served, self._virtual)

    def take(self, key_id: int, cost: float, images: int) -> None:
        """The key's head joins a batch: `cost` = its tokens / the key's weight."""
        k = self._keys[key_id]
        self._virtual = max(self._virtual, k.served)
        self._charge(key_id, k, cost, images)

    def drop(self, key_id: int, cost: float, images: int) -> None:
        """The key's head left the queue unrun (deadline, caller gone): charged, but the virtual time stays."""
        self._charge(key_id, self._keys[key_id], cost, images)

    def end_busy_period(self) -> None:
        """Nothing queued: virtual time moves to the latest finish tag (SFQ's idle rule), so a key that sent the most
        in the period just ended starts level with the others, not behind them."""
        if self._queued == 0:
            self._virtual = max(self._virtual, self._latest)
            for key_id, k in list(self._keys.items()):
                self._forget_if_idle(key_id, k)

    def reserve(self, key_id: int, nbytes: int) -> bool:
        """`nbytes` of a request of `key_id` are in memory (being read, then queued) until `release`; True: counted
        for the key too (always, here), which `release` is told."""
        self._keys.setdefault(key_id, _Key()).nbytes += nbytes
        self._nbytes += nbytes
        return True

    def release(self, key_id: int, nbytes: int, *, counted: bool) -> None:
        k = self._keys.get(key_id)
        if k is not None:
            k.nbytes -= nbytes
            self._nbytes -= nbytes
            self._forget_if_idle(key_id, k)

    def load(self, key_id: int) -> Load:
        k = self._keys.get(key_id)
        return Load(k.images if k else 0, k.nbytes if k else 0, self._images, self._nbytes)

    def _charge(self, key_id: int, k: _Key, cost: float, images: int) -> None:
        k.served += cost
        self._latest = max(self._latest, k.served)
        k.queued -= 1
        k.images -= images
        self._queued -= 1
        self._images -= images
        self._forget_if_idle(key_id, k)

    def _forget_if_idle(self, key_id: int, k: _Key) -> None:
        if k.queued == 0 and k.nbytes <= 0 and k.served <= self._virtual:
            del self._keys[key_id]  # lifted to the virtual time when it comes back: as if never seen


_VIRTUAL, _LATEST, _QUEUED, _IMAGES, _BYTES = range(5)


class SharedFairClock:
    """The same clock in shared memory, for processes started with `context` (pass it to them as an argument).

    An open-addressed table of `slots` keys; a key with nothing queued or in memory and no service beyond the virtual
    time holds its slot only until another key needs it. Past `slots` keys with work at once, a new key is served as a
    newcomer every time (fair within its worker only) and only the bounds in all apply to it, and a warning is logged
    once per process."""

    def __init__(self, context: BaseContext, slots: int = 4096) -> None:
        self._lock: Any = context.Lock()
        self._ids: Any = context.RawArray("q", slots)  # key id + 1; 0: never used
        self._served: Any = context.RawArray("d", slots)
        self._counts: Any = context.RawArray("q", slots)  # requests queued
        self._images: Any = context.RawArray("q", slots)
        self._nbytes: Any = context.RawArray("q", slots)
        self._scalars: Any = context.RawArray("d", 5)  # virtual time, latest finish tag; in all: requests, images,
        # bytes
        self._slots = slots
        self._init_local()

    def _init_local(self) -> None:
        self._where: dict[int, int] = {}  # key id -> its slot, as this process last found it
        # key id -> this process's requests of it queued while the table was full: they were counted in all only,
        # and leave before the key's later ones (a key's queue is first in, first out), also once it has a slot
        self._unslotted: dict[int, int] = {}
        self._warned = False

    def __getstate__(self) -> dict[str, Any]:
        local = ("_where", "_unslotted", "_warned")
        return {k: v for k, v in vars(self).items() if k not in local}

    def __setstate__(self, state: dict[str, Any]) -> None:
        vars(self).update(state)
        self._init_local()

    # ---- slots (called under the lock)
    def _slot(self, key_id: int, *, claim: bool) -> int:
        """The key's slot; with `claim`, a free one for a key not in the table (-1 when the table is full)."""
        cached = self._where.get(key_id, -1)
        if cached >= 0 and self._ids[cached] == key_id + 1:
            return cached
        start = hash(key_id) % self._slots
        free = -1
        for step in range(self._slots):
            i = (start + step) % self._slots
            held = self._ids[i]
            if held == key_id + 1:
                self._where[key_id] = i
                return i
            if held == 0:
                free = i if free < 0 else free
                break
            if free < 0 and self._idle(i):
                free = i  # its key is as good as absent: reusable, but the key may still lie further on
        if not claim or free < 0:
            if claim and not self._warned:
                self._warned = True
                log.warning("more keys with work at once than the fair-share table holds (%d)", self._slots)
            return -1
        self._ids[free], self._served[free] = key_id + 1, 0.0
        self._counts[free] = self._images[free] = self._nbytes[free] = 0
        self._where[key_id] = free
        return free

    def _left_unslotted(self, key_id: int) -> bool:
        """A request of `key_id` leaves the queue: True when it was queued without a slot (counted in all only)."""
        held = self._unslotted.get(key_id, 0)
        if held == 0:
            return False
        if held == 1:
            del self._unslotted[key_id]
        else:
            self._unslotted[key_id] = held - 1
        return True

    def _idle(self, i: int) -> bool:
        return self._counts[i] == 0 and self._nbytes[i] <= 0 and self._served[i] <= self._scalars[_VIRTUAL]

    # ---- the clock
    def queued(self, key_id: int, images: int) -> None:
        with self._lock:
            i = self._slot(key_id, claim=True)
            if i >= 0:
                if self._counts[i] == 0:
                    self._served[i] = max(self._served[i], self._scalars[_VIRTUAL])
                self._counts[i] += 1
                self._images[i] += images
            else:
                self._unslotted[key_id] = self._unslotted.get(key_id, 0) + 1
            self._scalars[_QUEUED] += 1
            self._scalars[_IMAGES] += images

    def start_tag(self, key_id: int) -> float:
        with self._lock:
            i = self._slot(key_id, claim=False)
            return self._served[i] if i >= 0 else self._scalars[_VIRTUAL]

    def next_start(self, key_id: int) -> float:
        with self._lock:
            i, virtual = self._slot(key_id, claim=False), self._scalars[_VIRTUAL]
            if i < 0:
                return virtual
            return self._served[i] if self._counts[i] else max(self._served[i], virtual)

    def take(self, key_id: int, cost: float, images: int) -> None:
        self._charge(key_id, cost, images, taken=True)

    def drop(self, key_id: int, cost: float, images: int) -> None:
        self._charge(key_id, cost, images, taken=False)

    def _charge(self, key_id: int, cost: float, images: int, *, taken: bool) -> None:
        with self._lock:
            i = -1 if self._left_unslotted(key_id) else self._slot(key_id, claim=False)
            if i >= 0:
                if taken:
                    self._scalars[_VIRTUAL] = max(self._scalars[_VIRTUAL], self._served[i])
                self._served[i] += cost
                self._scalars[_LATEST] = max(self._scalars[_LATEST], self._served[i])
                self._counts[i] -= 1
                self._images[i] -= images
            self._scalars[_QUEUED] -= 1
            self._scalars[_IMAGES] -= images

    def end_busy_period(self) -> None:
        with self._lock:
            if self._scalars[_QUEUED] == 0:  # nothing queued on any worker
                self._scalars[_VIRTUAL] = max(self._scalars[_VIRTUAL], self._scalars[_LATEST])

    def reserve(self, key_id: int, nbytes: int) -> bool:
        with self._lock:
            i = self._slot(key_id, claim=True)
            if i >= 0:
                self._nbytes[i] += nbytes
            self._scalars[_BYTES] += nbytes
            return i >= 0

    def release(self, key_id: int, nbytes: int, *, counted: bool) -> None:
        with self._lock:
            i = self._slot(key_id, claim=False) if counted else -1
            if i >= 0:
                self._nbytes[i] -= nbytes
            self._scalars[_BYTES] -= nbytes

    def load(self, key_id: int) -> Load:
        with self._lock:
            i = self._slot(key_id, claim=False)
            key_images, key_bytes = (self._images[i], self._nbytes[i]) if i >= 0 else (0, 0)
            return Load(key_images, key_bytes, int(self._scalars[_IMAGES]), int(self._scalars[_BYTES]))
