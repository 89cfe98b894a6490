"""Token-budget micro-batching: requests from many clients are queued and run through the teacher together.

A batch is sealed when its teacher tokens reach `token_budget`, its images reach `max_batch_images`, or the first
request has waited `max_delay_s` and the worker is free (while the worker is busy, the open batch keeps filling).
The forward runs in a worker thread and the `finalize` hook (the ledger commit) in the commit stage's own thread
(commit_stage.py), so batch i+1's forward overlaps batch i's commit; the event loop stays free and every result is
committed before it is handed back.

Rows with different keep counts: `bucket` groups rows by count and runs each group unpadded (rows with the same
count, from any request, concatenate); `pad` pads to the longest row and masks (MaskedTeacher's keep_counts).
Measured on this project's 2-core CPU (benchmarks/teacher_server/bench_mixed_k.py: float32, 2 threads, best of 7,
random weights; the machine was shared, so CPU time is the steadier figure):
  vit_tiny 32px/4px (64 patches), 64 images, counts from {16, 32, 48, 64}: bucket 1112 ms wall / 744 ms CPU,
                                                                          pad    1560 ms wall / 1027 ms CPU
  vit_small 224px (196 patches), 16 images, counts from {98, 147, 196}:    bucket  444 ms wall / 885 ms CPU,
                                                                          pad     720 ms wall / 1418 ms CPU
Bucketing wins (padding pays attention and MLP for padded tokens; the masked path also loses fused attention), and
it keeps every row's computation the same as when its request runs alone, so it is the default.
CPU BLAS picks GEMM kernels by matrix size, so a row's logits can differ from a lone run in the last float bits
(max |diff| ~1e-7 on the tiny ViT); values are otherwise identical.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from teacher_server.engine.commit_stage import CommitStage, Forwarded, commit_results
from teacher_server.engine.prefetch import Prefetcher
from teacher_server.engine.preprocess import PreparedInput
from teacher_server.errors import ServiceUnavailableError
from teacher_server.metrics import ServerMetrics

# forward(patches [G,K,C,P,P], keep_indices [G,K], keep_counts [G] | None) -> logits [G, classes] float32 CPU
ForwardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass
class BatchStats:
    images: int  # images in the micro-batch
    tokens: int  # teacher tokens in the micro-batch
    compute_s: float  # forward time
    started_at: float  # time.monotonic() when the forward began


@dataclass
class BatchJob:
    """One request waiting in the queue."""

    prepared: PreparedInput
    tokens: int  # sum over rows of keep_count + prefix tokens
    context: Any  # opaque to the batcher; handed to `finalize`
    future: asyncio.Future[JobResult]
    enqueued_at: float = field(default_factory=time.monotonic)

    @property
    def images(self) -> int:
        return self.prepared.images


@dataclass
class JobResult:
    logits: torch.Tensor  # [B, classes] float32 CPU
    queue_s: float
    stats: BatchStats
    finalized: Any  # what `finalize` returned for this job


# finalize(jobs, logits per job, stats) -> one value per job; runs in the worker thread after the forward.
FinalizeFn = Callable[[Sequence[BatchJob], Sequence[torch.Tensor], BatchStats], Sequence[Any]]


def run_bucketed(
    forward: ForwardFn, patches: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """One forward per distinct keep count, rows trimmed to their count: no padding at all."""
    counts_list = counts.tolist()
    out: torch.Tensor | None = None
    for k in sorted(set(counts_list)):
        rows = torch.tensor([i for i, c in enumerate(counts_list) if c == k])
        logits = forward(patches[rows, :k], indices[rows, :k], None)  # [G, classes]
        if out is None:
            out = torch.empty(len(counts_list), logits.shape[1], dtype=logits.dtype)
        out[rows] = logits
    assert out is not None
    return out


def run_padded(forward: ForwardFn, patches: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """One forward over all rows padded to the longest count, padding masked out."""
    k = int(counts.max())
    uniform = bool((counts == k).all())
    return forward(patches[:, :k], indices[:, :k], None if uniform else counts)


def concat_jobs(jobs: Sequence[BatchJob]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of all jobs as one batch, padded along K to the widest job (counts say what is real)."""
    k_max = max(int(j.prepared.keep_indices.shape[1]) for j in jobs)
    if all(int(j.prepared.keep_indices.shape[1]) == k_max for j in jobs):
        return (
            torch.cat([j.prepared.patches for j in jobs]),
            torch.cat([j.prepared.keep_indices for j in jobs]),
            torch.cat([j.prepared.keep_counts for j in jobs]),
        )
    patches, indices = [], []
    for j in jobs:
        pad = k_max - int(j.prepared.keep_indices.shape[1])
        patches.append(torch.nn.functional.pad(j.prepared.patches, (0, 0, 0, 0, 0, 0, 0, pad)))
        indices.append(torch.nn.functional.pad(j.prepared.keep_indices, (0, pad)))
    return torch.cat(patches), torch.cat(indices), torch.cat([j.prepared.keep_counts for j in jobs])


_STOP = object()


class TokenBudgetBatcher:
    """Async queue in front of one teacher. `submit` from the event loop; `start`/`close` around its life."""

    def __init__(
        self,
        forward: ForwardFn,
        *,
        num_prefix_tokens: int,
        token_budget: int,
        max_batch_images: int,
        max_delay_s: float,
        mixed_k: Literal["bucket", "pad", "pack"] = "bucket",
        finalize: FinalizeFn | None = None,
        metrics: ServerMetrics | None = None,
        name: str = "teacher",
        prefetch_device: torch.device | None = None,
    ) -> None:
        self._forward = forward
        self._prefetch = Prefetcher(concat_jobs, prefetch_device, name)  # next batch staged during the forward
        self._prefix = num_prefix_tokens
        self._token_budget = token_budget
        self._max_images = max_batch_images
        self._max_delay_s = max_delay_s
        self._run_rows = run_bucketed if mixed_k == "bucket" else run_padded  # pack: the forward packs ragged rows
        self._finalize = finalize
        self._metrics = metrics
        self._name = name
        self._queue: asyncio.Queue[Any] | None = None
        self._collector: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._busy: asyncio.Future[Any] | None = None
        self._commits: CommitStage | None = None
        self._closing = False

    @property
    def max_batch_images(self) -> int:
        return self._max_images

    def tokens_of(self, prepared: PreparedInput) -> int:
        return int(prepared.keep_counts.sum()) + self._prefix * prepared.images

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"forward-{self._name}")
        self._commits = CommitStage(self._commit, name=self._name)
        self._collector = asyncio.create_task(self._collect(), name=f"batcher-{self._name}")

    async def submit(self, prepared: PreparedInput, context: Any = None) -> JobResult:
        """Queue one request and wait for its logits (committed by `finalize` before this returns)."""
        if self._queue is None or self._closing:
            raise ServiceUnavailableError("the server is shutting down; retry on another instance")
        job = BatchJob(prepared, self.tokens_of(prepared), context, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(job)
        if self._metrics:
            self._metrics.queue_depth.inc()
        return await job.future

    async def close(self) -> None:
        """Stop taking requests, run everything already queued, then stop the worker."""
        if self._queue is None or self._closing:
            return
        self._closing = True
        self._queue.put_nowait(_STOP)
        if self._collector is not None:
            await self._collector
        if self._busy is not None:
            await asyncio.gather(self._busy, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if self._commits is not None:
            await self._commits.close()
        self._prefetch.close()

    # ------------------------------------------------------------------------------------------------------------

    async def _next_item(self, deadline: float) -> Any:
        """The next queued item; None when the deadline passed and the worker is free (time to dispatch)."""
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        timeout = deadline - loop.time()
        if timeout > 0:
            try:
                return await asyncio.wait_for(self._queue.get(), timeout)
            except TimeoutError:
                pass
        if self._busy is None or self._busy.done():
            return None if self._queue.empty() else self._queue.get_nowait()
        # Worker still busy with the previous batch: keep filling this one until it is free.
        getter = asyncio.ensure_future(self._queue.get())
        await asyncio.wait({getter, self._busy}, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            return getter.result()
        getter.cancel()
        return None if self._queue.empty() else self._queue.get_nowait()

    async def _collect(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        carry: Any = None
        stopping = False
        while not stopping:
            first = carry if carry is not None else await self._queue.get()
            carry = None
            if first is _STOP:
                break
            batch = [first]
            images, tokens = first.images, first.tokens
            deadline = loop.time() + self._max_delay_s
            while images < self._max_images and tokens < self._token_budget:
                item = await self._next_item(deadline)
                if item is None:
                    break
                if item is _STOP:
                    stopping = True
                    break
                if images + item.images > self._max_images or tokens + item.tokens > self._token_budget:
                    carry = item
                    break
                batch.append(item)
                images += item.images
                tokens += item.tokens
            staged = self._prefetch.start(batch) if self._busy is not None and not self._busy.done() else None
            if self._busy is not None:
                await asyncio.gather(self._busy, return_exceptions=True)
            assert self._commits is not None
            await self._commits.wait_for_room()
            if self._metrics:
                self._metrics.queue_depth.dec(len(batch))
            assert self._executor is not None
            self._busy = loop.run_in_executor(self._executor, self._run, batch, staged)
            self._busy.add_done_callback(functools.partial(self._forwarded, batch))
        if carry is not None and carry is not _STOP:  # cannot happen after _STOP, but never strand a client
            carry.future.set_exception(ServiceUnavailableError("the server is shutting down"))

    def _run(self, jobs: list[BatchJob], staged: Any = None) -> Forwarded | list[Any] | BaseException:
        """Worker thread: forward the live jobs; the commit stage commits them."""
        live = [j for j in jobs if not j.future.done()]  # callers that went away before the forward: not billed
        if not live:
            return []
        try:
            started = time.monotonic()
            patches, indices, counts = self._prefetch.take(staged, live) or concat_jobs(live)
            with torch.inference_mode():
                logits = self._run_rows(self._forward, patches, indices, counts)  # [sum B, classes]
            compute_s = time.monotonic() - started
            stats = BatchStats(
                images=int(patches.shape[0]),
                tokens=sum(j.tokens for j in live),
                compute_s=compute_s,
                started_at=started,
            )
            per_job = [t.clone() for t in torch.split(logits, [j.images for j in live])]
        except Exception as exc:  # noqa: BLE001 - delivered to every caller of the batch; nothing was committed
            return exc
        if self._metrics:
            self._metrics.batch_images.observe(stats.images)
            self._metrics.batch_tokens.observe(stats.tokens)
            self._metrics.compute_seconds.observe(compute_s)
        return Forwarded(live, per_job, stats)

    def _commit(self, batch: Forwarded) -> list[tuple[BatchJob, JobResult]] | BaseException:
        """Commit thread: finalize (the ledger commit), then (job, result) per job."""
        try:
            finalized = commit_results(batch, self._finalize)
        except Exception as exc:  # noqa: BLE001 - delivered to every caller of the batch; nothing was committed
            return exc
        out = []
        for job, job_logits, fin in zip(batch.jobs, batch.logits, finalized, strict=True):
            queue_s = max(0.0, batch.stats.started_at - job.enqueued_at)
            if self._metrics:
                self._metrics.queue_seconds.observe(queue_s)
            out.append((job, JobResult(job_logits, queue_s, batch.stats, fin)))
        return out

    def _forwarded(self, jobs: list[BatchJob], fut: asyncio.Future[Any]) -> None:
        """Event loop: a forward finished; hand it to the commit stage (or its error to the callers)."""
        if not fut.cancelled() and fut.exception() is None and isinstance(fut.result(), Forwarded):
            assert self._commits is not None
            batch: Forwarded = fut.result()
            self._commits.submit(batch).add_done_callback(lambda done: self._deliver(batch.jobs, done))
            return
        self._deliver(jobs, fut)

    @staticmethod
    def _deliver(jobs: list[BatchJob], fut: asyncio.Future[Any]) -> None:
        """Event loop: hand each caller its result (or the batch's error)."""
        outcome: Any = (
            fut.exception() or fut.result()
            if not fut.cancelled()
            else ServiceUnavailableError("the forward was cancelled")
        )
        if isinstance(outcome, BaseException):
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(outcome)
            return
        for job, result in outcome:
            if not job.future.done():
                job.future.set_result(result)
