"""The commit stage of the batcher: `finalize` (the ledger commit) of batch i runs on its own thread while the
forward thread already runs batch i+1, so a slow commit no longer idles the teacher.

Order and safety: batches commit one at a time in forward order, and a batch's callers get their results only when
its commit returned (nothing is answered before its usage row is committed). At most one finished forward waits for
the commit stage (`wait_for_room`), so a ledger slower than the teacher slows the forwards instead of piling up
uncommitted answers in memory.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from maskedkd.torch_threads import helper_pool
from teacher_server.engine.batching.batch_job import BatchJob, BatchStats, FinalizeFn, JobResult
from teacher_server.engine.rows.answers import Answer
from teacher_server.errors import ServiceUnavailableError
from teacher_server.metrics import ServerMetrics

MAX_WAITING_COMMITS = 1  # finished forwards queued behind the running commit


@dataclass
class Forwarded:
    """A batch whose forward is done, on its way to the commit."""

    jobs: list[BatchJob]  # the live ones
    answers: list[Answer]  # per job: logits [B_j, classes] and the outputs it asked for
    stats: BatchStats


class CommitStage:
    """One commit thread. `submit` from the event loop; the returned future resolves after the commit."""

    def __init__(self, commit: Callable[[Forwarded], Any], *, name: str) -> None:
        self._commit = commit
        self._executor = helper_pool(1, f"commit-{name}")
        self._pending: deque[asyncio.Future[Any]] = deque()

    def submit(self, batch: Forwarded) -> asyncio.Future[Any]:
        future = asyncio.get_running_loop().run_in_executor(self._executor, self._commit, batch)
        self._pending.append(future)
        future.add_done_callback(self._pending.remove)
        return future

    async def wait_for_room(self) -> None:
        """Wait until at most MAX_WAITING_COMMITS batches wait behind the running commit."""
        while len(self._pending) > MAX_WAITING_COMMITS:
            await asyncio.wait([self._pending[0]])

    async def close(self) -> None:
        """Let every submitted commit finish, then stop the thread."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)
        self._executor.shutdown(wait=True)


def commit_batch(
    batch: Forwarded, *, finalize: FinalizeFn | None, metrics: ServerMetrics | None
) -> list[tuple[BatchJob, JobResult]] | BaseException:
    """Commit thread: `finalize` (the ledger commit), then (job, result) per job; the error instead if it failed."""
    try:
        finalized = (
            [None] * len(batch.jobs) if finalize is None else list(finalize(batch.jobs, batch.answers, batch.stats))
        )
    except Exception as exc:  # noqa: BLE001 - delivered to every caller of the batch; nothing was committed
        return exc
    out = []
    for job, answer, fin in zip(batch.jobs, batch.answers, finalized, strict=True):
        queue_s = max(0.0, batch.stats.started_at - job.enqueued_at)
        if metrics:
            metrics.observe_queue_wait(queue_s, key=job.key_name)
        out.append((job, JobResult(answer.logits, queue_s, batch.stats, fin, answer.outputs)))
    return out


def deliver_error(jobs: Sequence[BatchJob], error: BaseException) -> None:
    """Event loop: hand `error` to every caller of `jobs` still waiting."""
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(error)


def deliver(jobs: list[BatchJob], fut: asyncio.Future[Any]) -> None:
    """Event loop: hand each caller its result from the commit's future `fut` (or the batch's error)."""
    if fut.cancelled():
        outcome: Any = ServiceUnavailableError("the commit was cancelled")
    else:
        outcome = fut.exception() or fut.result()
    if isinstance(outcome, BaseException):
        deliver_error(jobs, outcome)
        return
    for job, result in outcome:
        if not job.future.done():
            job.future.set_result(result)
