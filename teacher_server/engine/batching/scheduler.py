"""Which queued requests form the next micro-batch: fair shares across API keys, priorities, deadlines and bounds.

- **Fair share.** Every key has its own queue. Within a priority class, queues are served by start-time fair queuing
  (Goyal et al., 1997) on teacher tokens: a key's head starts at the key's service so far (tokens / weight of the
  requests taken), lifted to the virtual time when the key had nothing queued; the batch takes queue heads in
  start-tag order. The tags are read from a clock (fair_clock.py) that the ingest workers share, so service on one
  worker counts on all of them. A key with little traffic so
  waits about as long as it would alone, whatever another key sends, and requests of several keys still share a
  batch. A key's weight is part of its limits (`teacher-server keys share NAME --weight W`, default 1).
- **Priorities.** `interactive` keys are served before `standard` ones, `standard` before `batch`; fair queuing
  applies within a class.
- **Deadlines.** A request whose deadline cannot be met when its batch forms (its time left is below the batch's
  expected compute) is dropped unrun; the batcher answers DEADLINE_EXCEEDED, nothing billed.
- **Chunks.** A chunk of a request larger than a batch (split_requests.py) joins a batch only as its first request:
  it fills most of one by itself, so a smaller request of another key taken before it would wait for all of it.
- **Bounds.** Queued images, tokens and bytes are bounded per key and in all (`QueueLimits`); `room_for` says, before
  a request is read, whether a key may queue more, and `expected_wait_s` how long a request would wait.

All of it runs on the event loop (no locks). Times are `time.monotonic()`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from teacher_server.engine.batching.fair_clock import Clock, FairClock
from teacher_server.priorities import rank_of


class Queued(Protocol):
    """What the scheduler reads of a queued request."""

    key_id: int
    weight: float
    priority: str
    tokens: int
    deadline: float | None  # monotonic time the caller gives up; None: no deadline
    enqueued_at: float  # monotonic time it was queued
    start_tag: float  # set as it is taken into a batch: its start tag, on the clock (shared by ingest workers)

    @property
    def leads_batch(self) -> bool: ...  # joins a batch only as its first request (a chunk of a split request)

    @property
    def images(self) -> int: ...


J = TypeVar("J", bound=Queued)


class Backlog(Protocol):
    """Told of the requests of each priority class (`rank_of`) a batcher takes in and of those it lets go unrun, and
    of each batch it forms (its best class and that class's smallest start tag) and of those it never sends, and of
    the request its queue would take next (its class and key): an ingest worker's counters (ingest/class_backlog.py),
    which the device process reads to run the workers' calls in the order one fair queue would."""

    def taken(self, rank: int) -> None: ...
    def let_go(self, ranks: Iterable[int]) -> None: ...
    def formed(self, rank: int, tag: float) -> None: ...
    def abandoned(self) -> None: ...
    def queue_head(self, head: tuple[int, int] | None) -> None: ...


@dataclass(frozen=True)
class QueueLimits:
    """What may wait at once, per key and in all (0: no bound)."""

    key_images: int = 0
    key_bytes: int = 0
    total_images: int = 0
    total_bytes: int = 0


@dataclass
class _KeyQueue(Generic[J]):
    """A key's queued requests; the queue is dropped when its last request leaves (the clock keeps the key's tags)."""

    jobs: deque[J] = field(default_factory=deque)
    tokens: int = 0


class FairQueue(Generic[J]):
    """Per-key queues, strict priority classes, start-time fair queuing within a class."""

    def __init__(self, limits: QueueLimits | None = None, clock: Clock | None = None) -> None:
        self.limits = limits or QueueLimits()
        self._keys: dict[int, _KeyQueue[J]] = {}
        self._clock = clock or FairClock()
        self.images = 0  # queued here (the bounds read the clock's counts, which ingest workers share)
        self.tokens = 0

    # ---- bounds
    def room_for(self, key_id: int, nbytes: int = 0, images: int = 0) -> str | None:
        """None when `key_id` may queue a request of this size now, else why not (one line, for the refusal)."""
        lim, now = self.limits, self._clock.load(key_id)
        if lim.key_images and now.key_images + images > lim.key_images and now.key_images:
            return f"this key has {now.key_images} images queued (at most {lim.key_images})"
        if lim.key_bytes and now.key_bytes + nbytes > lim.key_bytes and now.key_bytes:
            return f"this key has {now.key_bytes / 2**20:.0f} MiB queued (at most {lim.key_bytes / 2**20:.0f} MiB)"
        if lim.total_images and now.images + images > lim.total_images and now.images:
            return f"the server has {now.images} images queued (at most {lim.total_images})"
        if lim.total_bytes and now.nbytes + nbytes > lim.total_bytes and now.nbytes:
            return f"the server has {now.nbytes / 2**20:.0f} MiB queued (at most {lim.total_bytes / 2**20:.0f} MiB)"
        return None

    def reserve_bytes(self, key_id: int, nbytes: int) -> bool:
        """Count `nbytes` against the key and the server before the request is read; pass what it returns to
        `release_bytes` after (whether the key's count holds them)."""
        return self._clock.reserve(key_id, nbytes)

    def release_bytes(self, key_id: int, nbytes: int, *, counted: bool) -> None:
        self._clock.release(key_id, nbytes, counted=counted)

    # ---- queueing
    def push(self, job: J) -> None:
        """Queue `job` behind its key's earlier requests."""
        q = self._keys.setdefault(job.key_id, _KeyQueue())
        self._clock.queued(job.key_id, job.images)
        q.jobs.append(job)
        q.tokens += job.tokens
        self.images += job.images
        self.tokens += job.tokens

    def __len__(self) -> int:
        return sum(len(q.jobs) for q in self._keys.values())

    def key_tokens(self, key_id: int) -> int:
        """Teacher tokens queued for a key."""
        q = self._keys.get(key_id)
        return q.tokens if q else 0

    def head(self, exclude: frozenset[int] = frozenset()) -> J | None:
        """The request `next_batch` would take first, with the keys of `exclude` left out."""
        found = self._head(exclude)
        return None if found is None else found[0]

    def _head(self, exclude: frozenset[int] = frozenset()) -> tuple[J, float] | None:
        """The next request to serve and its start tag: the smallest start tag among queue heads of the highest
        non-empty class (keys in `exclude` left out)."""
        best: J | None = None
        best_order = (0, 0.0)
        for key_id, q in self._keys.items():
            if key_id in exclude:
                continue
            job = q.jobs[0]
            order = (_rank(job), self._clock.start_tag(key_id))
            if best is None or order < best_order:
                best, best_order = job, order
        return None if best is None else (best, best_order[1])

    def _pop(self, job: J, *, taken: bool) -> None:
        """Take the key's head out of the queue, into a batch (`taken`) or not: charged to the key either way."""
        if taken:
            self._clock.take(job.key_id, cost(job), job.images)
        else:
            self._clock.drop(job.key_id, cost(job), job.images)
        q = self._keys[job.key_id]
        q.jobs.popleft()
        q.tokens -= job.tokens
        self.images -= job.images
        self.tokens -= job.tokens
        if not q.jobs:
            del self._keys[job.key_id]

    def oldest_enqueued(self) -> float:
        """When the longest-waiting queued request was queued (inf when none is)."""
        return min((q.jobs[0].enqueued_at for q in self._keys.values()), default=float("inf"))

    def next_batch(
        self,
        *,
        max_images: int,
        token_budget: int,
        now: float,
        finish_s: Callable[[int], float],
        live: Callable[[J], bool],
        exclude: frozenset[int] = frozenset(),
        max_rank: int | None = None,
    ) -> tuple[list[J], list[J]]:
        """(the next micro-batch, the requests dropped because their deadline cannot be met). Takes queue heads in
        fair order while they fit; a request that would miss its deadline even in the batch formed so far (done
        `finish_s(tokens)` seconds from `now`) is dropped instead of run, one whose caller went away (not `live`) is
        dropped silently. The first request always fits (one larger than a batch is queued as chunks that each fit,
        split_requests.py, but a chunk is never below 512 tokens, whatever the budget). The keys of `exclude` are
        left queued (a batch run between the blocks of theirs: preemption.py), and so are requests of a worse class
        than `max_rank` (such a batch runs none of a worse class than the batch it interrupts)."""
        batch: list[J] = []
        dropped: list[J] = []
        images = tokens = 0
        while (head := self._head(exclude)) is not None:
            job, start_tag = head
            if max_rank is not None and _rank(job) > max_rank:
                break  # heads come best class first: every request left is of a worse class
            if not live(job):
                self._pop(job, taken=False)
                continue
            if job.deadline is not None and job.deadline < now + finish_s(tokens + job.tokens):
                self._pop(job, taken=False)
                dropped.append(job)
                continue
            if batch and (job.leads_batch or images + job.images > max_images or tokens + job.tokens > token_budget):
                break
            job.start_tag = start_tag
            self._pop(job, taken=True)
            batch.append(job)
            images += job.images
            tokens += job.tokens
        if not self._keys:
            self._clock.end_busy_period()
        return batch, dropped

    # ---- estimates
    def tokens_ahead(self, key_id: int, priority: str, tokens: int, weight: float) -> int:
        """Teacher tokens served before a request of `key_id` with `tokens` queued now would be: what higher classes
        hold, and what same-class keys hold with start tags before its finish tag (fair queuing)."""
        q = self._keys.get(key_id)
        if q is not None:
            start = self._clock.start_tag(key_id) + sum(cost(job) for job in q.jobs)
        else:
            start = self._clock.next_start(key_id)
        finish = start + tokens / max(weight, 1e-9)
        rank = rank_of(priority)
        ahead = 0
        for other_id, other in self._keys.items():
            tag = self._clock.start_tag(other_id)
            for job in other.jobs:
                r = _rank(job)
                if r < rank or (r == rank and tag < finish):
                    ahead += job.tokens
                tag += cost(job)
        return ahead


def _rank(job: Queued) -> int:
    return rank_of(job.priority)


def cost(job: Queued) -> float:
    """What a request adds to its key's service: its teacher tokens per unit of the key's weight."""
    return job.tokens / max(job.weight, 1e-9)


@dataclass
class ComputeEstimate:
    """Running estimate of the forward's cost, seconds = fixed + per_token * tokens, fitted by least squares over the
    observed batches with exponentially decaying weights (recent batches count most), for deadlines and wait
    estimates. A fit, not a ratio: small batches' fixed cost would otherwise inflate the per-token rate and drop
    requests that a full batch serves in time. The first batch is not counted (it carries the one-time set-up of the
    allocator and kernels), and one observation far above the estimate moves it by at most `max_step` x."""

    decay: float = 0.9  # weight kept by past batches at each new one (~10 batches remembered)
    max_step: float = 4.0
    _first_seen: bool = False
    _w: float = 0.0  # decayed sums: weight, tokens, seconds, tokens^2, tokens*seconds
    _t: float = 0.0
    _s: float = 0.0
    _tt: float = 0.0
    _ts: float = 0.0

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        if not self._first_seen:
            self._first_seen = True
            return
        if self._w > 0:
            seconds = min(seconds, self.max_step * max(self.seconds(tokens), 1e-6))
        d = self.decay
        self._w = d * self._w + 1.0
        self._t = d * self._t + tokens
        self._s = d * self._s + seconds
        self._tt = d * self._tt + tokens * tokens
        self._ts = d * self._ts + tokens * seconds

    def _fit(self) -> tuple[float, float]:
        """(fixed_s, per_token_s); through the origin while the batches seen are all of one size."""
        if self._w == 0:
            return 0.0, 0.0
        mean_t, mean_s = self._t / self._w, self._s / self._w
        var_t = self._tt / self._w - mean_t * mean_t
        if var_t <= 1e-9 * max(mean_t * mean_t, 1.0):
            return 0.0, mean_s / mean_t
        slope = (self._ts / self._w - mean_t * mean_s) / var_t
        if slope <= 0:  # noise on near-equal sizes: no trustworthy slope
            return 0.0, mean_s / mean_t
        fixed = mean_s - slope * mean_t
        if fixed < 0:
            # The least-squares fit with fixed >= 0 is the one through the origin. Keeping the steeper free slope
            # instead (fixed clipped to 0) overstates every batch: one slow larger batch among many small ones
            # then caps the budget below two requests, and with only small batches run the fit never recovers.
            return 0.0, self._ts / self._tt
        return fixed, slope

    def seconds(self, tokens: int) -> float:
        fixed, per_token = self._fit()
        return fixed + per_token * tokens

    def tokens_within(self, seconds: float) -> int:
        """The most tokens a forward runs in `seconds` (a very large number while nothing was observed)."""
        fixed, per_token = self._fit()
        if per_token <= 0:
            return 2**62
        return max(0, int((seconds - fixed) / per_token))
