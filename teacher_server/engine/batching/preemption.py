"""Another key's batch run between two blocks of a long CPU forward: a light key waits for a block, not a batch.

While keys share a CPU teacher, a batch of one key holds the teacher for up to `--max-batch-ms` of forward, and a
request of another key arriving just after it started waited for all of it: on a 2-core CPU that is 100 ms beside a
35-50 ms light request, so the light key's p99 under another key's flood was 1.8-3x its p99 alone (performance notes,
section 32). Halving the bound brought it near 2x at ~15% of the flood's throughput.

Instead, on an eager CPU teacher in the serving process, the batcher forms the batch that fair queuing would run next
among the keys not in the running batch and the priority classes no worse than its best (led by a request that runs
in less than what is left of the running forward) while the forward runs, stages it, and offers it here.
At the next block boundary the forward thread runs that batch whole (its own forward, with no yield points inside),
then goes on with its own rows. A batch is never cut: each runs with the rows it was formed with, so every request's
logits are those of its own batch, and billing is as for any batch. An offer that no block takes (the running forward
ended first, or running it would make a caller of the running batch miss its deadline) runs on the forward thread's
queue right after the running forward, as any batch would.

Not on a GPU (a forward is queued kernels there, and the token budget keeps batches short), nor for a compiled
forward (its graph has no blocks to stop between), nor with ingest workers (the device process runs their batches in
its own order). A forward that runs its blocks' parts itself (ToMe's merging blocks, `--mixed-k pack`) has no yield
points, and a batch whose requests ask for extra outputs is never interrupted.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar

from torch import nn

T = TypeVar("T")

# A batch is offered only while the running forward has more than this left by the estimate: a block boundary is then
# still ahead (a tiny ViT's block is ~1/12 of its forward), and less than this is not worth the running batch's wait.
PREEMPT_MIN_S = 0.01
SHARE_DECAY = 0.8  # of the running share of forward time spent on offers, at each preemptible forward (~5 remembered)
MAX_SHARE = 0.5  # the share that admission allows for, at most
# ... and at least, while another key shares the teacher: the learned share is ~0 when another key's flood begins (no
# offers ran while one key was alone), and requests admitted to the edge of their deadlines would leave no room for
# any offer inside their forwards (one light request waited 94 ms there; performance notes, section 33)
MIN_SHARED_SHARE = 0.1


@dataclass(frozen=True)
class RunningBatch:
    """What the batcher reads of the batch whose forward runs, to choose what may run between its blocks."""

    keys: frozenset[int]  # its requests' API keys: an offered batch holds none of theirs
    rank: int  # its best priority class (priorities.rank_of): an offered batch is of no worse class
    latest_end: float = math.inf  # monotonic time its first caller gives up, less the commit's margin

    def allows(self, *, now_until: float, extra_s: float) -> bool:
        """Whether it may end `extra_s` later than the estimate `now_until` and still reach all its callers."""
        return now_until + extra_s <= self.latest_end


@dataclass
class ForwardSpan:
    """One preemptible forward, as the forward thread runs it."""

    inside_s: float = 0.0  # seconds of offers run between its blocks: not its own compute


class Offer(Generic[T]):
    """A batch's forward that whichever comes first runs, once: a block boundary of the running forward (`nested`)
    or the forward thread's queue after it. `fits()`: whether running it now keeps the running batch's deadlines."""

    def __init__(self, run: Callable[[bool], T], fits: Callable[[], bool]) -> None:
        self._run = run
        self.fits = fits
        self.result: Future[T] = Future()
        self._taken = False
        self._lock = threading.Lock()

    @property
    def taken(self) -> bool:
        return self._taken

    def take(self) -> bool:
        """Claim it: True once, for the caller that will run it."""
        with self._lock:
            taken, self._taken = self._taken, True
            return not taken

    def run(self, *, nested: bool) -> None:
        """Run it (after `take`) and hand its result or exception to `result`."""
        try:
            self.result.set_result(self._run(nested))
        except BaseException as exc:  # noqa: BLE001 - handed to the event loop awaiting `result`
            self.result.set_exception(exc)

    def run_unless_taken(self) -> None:
        """The forward thread's queue: run it unless a block boundary already did."""
        if self.take():
            self.run(nested=False)


class YieldPoints:
    """Forward pre-hooks on a teacher's blocks: inside `preemptible`, the forward thread runs a waiting `Offer` at the
    next block boundary. Other threads running the teacher (start-up checks, warm-up) never do."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        self._waiting: Offer[object] | None = None
        self._thread: int | None = None  # the forward thread, while its forward may be preempted
        self._span: ForwardSpan | None = None  # the preemptible forward running, while one runs
        self.share = 0.0  # of the recent preemptible forwards' time, the part their offers took (decaying average)
        self.handles = [block.register_forward_pre_hook(self._at_block) for block in blocks]

    @contextlib.contextmanager
    def preemptible(self, span: ForwardSpan) -> Iterator[None]:
        """Forward thread: around a batch's forward that an offer may interrupt between blocks; `span` gets the
        time those offers take."""
        self._thread, self._span = threading.get_ident(), span
        started = time.monotonic()
        try:
            yield
        finally:
            self._thread = self._span = None
            wall = time.monotonic() - started
            if wall > 0:
                inside = min(1.0, span.inside_s / wall)
                self.share = SHARE_DECAY * self.share + (1 - SHARE_DECAY) * inside

    def slowdown(self, *, shared: bool) -> float:
        """How much longer than its own forwards a request waits while offers run inside them, at the recent share
        (at least `MIN_SHARED_SHARE` when `shared`: other keys send too): what admission multiplies its estimate by,
        so that a request admitted leaves room for them (a running batch whose callers could not wait is never
        interrupted)."""
        share = max(self.share, MIN_SHARED_SHARE) if shared else self.share
        return 1.0 / (1.0 - min(share, MAX_SHARE))

    def offer(self, offer: Offer[T]) -> None:
        """Event loop: `offer` runs at the running forward's next block boundary where it fits (one at a time)."""
        self._waiting = offer  # type: ignore[assignment]  # the result type is the offerer's business

    @property
    def waiting(self) -> bool:
        """An offer was made and not yet taken."""
        offer = self._waiting
        return offer is not None and not offer.taken

    def _at_block(self, _module: nn.Module, _args: object) -> None:
        offer, span = self._waiting, self._span
        # not inside an offer's own forward (its blocks have these hooks too: span is None while it runs)
        if offer is None or span is None or self._thread != threading.get_ident():
            return
        if not offer.fits() or not offer.take():
            return
        self._waiting = self._span = None
        started = time.monotonic()
        try:
            offer.run(nested=True)
        finally:
            self._span = span
            span.inside_s += time.monotonic() - started
