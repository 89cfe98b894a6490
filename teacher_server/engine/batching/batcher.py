"""The micro-batcher: requests of many clients queued fairly per API key, then staged, run and committed together.

A request is `submit`ted (event loop) into the fair queue (scheduler.py); one larger than a batch may hold queues as
chunks of whole images that run in consecutive batches and is answered once, after its last (split_requests.py).
A batch is formed as the forward is about to be free, and no other formed batch waits for it, when it is full (token
budget, cut to `max_batch_s` of forward, or image cap) or its first request has waited `max_delay_s`; requests whose
deadline cannot be met are dropped unrun there (DEADLINE_EXCEEDED, nothing billed). Then three threads work like a
pipeline, so batch k+1 is staged while batch k runs its forward and batch k-1 commits:

- stage: the requests' bytes copied once into a reused buffer set (staging.py; on CUDA pinned, one copy to the device);
  on an eager CPU teacher, a batch of keys not running may also be staged while a forward runs, and run between two of
  its blocks (preemption.py);
- forward: the teacher on those rows (forward_step.py, which runs rows_runner.py; with ingest workers, in the device
  process: ingest/), logits back to the host;
- commit: the ledger rows of the batch in one transaction (commit_stage.py); only then does each caller get its
  answer. A failure before the commit is handed to every caller of the batch, and nothing of it is billed.

Bucketing keeps every row's computation the same as when its request runs alone, but CPU GEMM kernels are picked by
matrix size, so a row's logits move with the rows beside it (float32: ~1e-7 on the tiny ViT; bf16: a last bit at times).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from maskedkd.torch_threads import helper_pool
from teacher_server.engine.batching.batch_job import BatchJob, FinalizeFn, Handoff, JobResult, batch_order
from teacher_server.engine.batching.commit_stage import CommitStage, Forwarded, commit_batch, deliver, deliver_error
from teacher_server.engine.batching.fair_clock import Clock
from teacher_server.engine.batching.forward_step import COMMIT_S_MARGIN, ForwardStep
from teacher_server.engine.batching.preemption import PREEMPT_MIN_S, Offer, RunningBatch, YieldPoints
from teacher_server.engine.batching.scheduler import Backlog, ComputeEstimate, FairQueue, QueueLimits
from teacher_server.engine.batching.split_requests import LONE_BATCH_S, RecentSenders, split_job
from teacher_server.engine.rows.decode import DecodedInput
from teacher_server.engine.rows.rows_runner import AnswersFn
from teacher_server.engine.rows.staging import StagedRows, Stager
from teacher_server.errors import DeadlineUnmetError, ServiceUnavailableError
from teacher_server.metrics import ServerMetrics
from teacher_server.priorities import DEFAULT_PRIORITY, rank_of

STAGE_LEAD_S = 0.002  # beyond twice the staging time, how early the next batch forms before the forward is free


class TokenBudgetBatcher:
    """Queue in front of one teacher. `submit` from the event loop; `start`/`close` around its life."""

    def __init__(
        self,
        runner: AnswersFn,
        *,
        stager: Stager,
        num_prefix_tokens: int,
        token_budget: int,
        max_batch_images: int,
        max_delay_s: float,
        finalize: FinalizeFn | None = None,
        metrics: ServerMetrics | None = None,
        name: str = "teacher",
        limits: QueueLimits | None = None,
        clock: Clock | None = None,
        max_batch_s: float = 0.0,
        backlog: Backlog | None = None,
        chunk_sizes: Sequence[int] = (),
        yield_points: YieldPoints | None = None,
    ) -> None:
        self._stager = stager
        self._prefix = num_prefix_tokens
        self._token_budget = token_budget
        self._max_batch_s = max_batch_s  # a batch's expected forward at most this long (0: no bound)
        self._stage_s = 0.0  # running average of staging a batch: the next batch forms this long before it is due
        self._max_images = max_batch_images
        self._chunk_sizes = chunk_sizes  # the batch sizes the forward was prepared for: a split request's chunks
        self._max_delay_s = max_delay_s
        self._finalize = finalize
        self._metrics = metrics
        self._name = name
        self.queue: FairQueue[BatchJob] = FairQueue(limits, clock)  # clock: shared by ingest workers
        self._backlog = backlog  # an ingest worker's: what it holds per class, for the device's choice of batch
        self.compute = ComputeEstimate()
        self._changed: asyncio.Event | None = None
        self._collector: asyncio.Task[None] | None = None
        self._stage_pool: ThreadPoolExecutor | None = None
        self._forward_pool: ThreadPoolExecutor | None = None
        self._commits: CommitStage | None = None
        self._slots: asyncio.Semaphore | None = None
        self._waiting_forward: set[object] = set()  # batches formed whose forward has not started
        self._yields = yield_points  # None: no batch runs between another's blocks
        self._step = ForwardStep(
            runner,
            compute=self.compute,
            yields=yield_points,
            metrics=metrics,
            let_go=self._let_go,
            wake=self._wake_from_thread,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._in_flight: set[asyncio.Future[Any]] = set()
        self.batches_started = 0  # micro-batches taken from the queue so far (the server's idle trim reads it)
        self._closing = False
        self._senders = RecentSenders()  # who shares the teacher: batches are then bounded, large requests cut

    @property
    def runner(self) -> AnswersFn:
        """Runs a staged batch: here (rows_runner.py) or in the device process (ingest/)."""
        return self._step.runner

    @runner.setter
    def runner(self, runner: AnswersFn) -> None:
        self._step.runner = runner

    @property
    def max_batch_images(self) -> int:
        return self._max_images

    def tokens_of(self, decoded: DecodedInput) -> int:
        return int(decoded.keep_counts.sum()) + self._prefix * decoded.images

    def _stage_clock(self, stage: str) -> contextlib.AbstractContextManager[None]:
        return self._metrics.stage(stage) if self._metrics else contextlib.nullcontext()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._slots = asyncio.Semaphore(self._stager.slots)
        self._stage_pool = helper_pool(1, f"stage-{self._name}")
        self._forward_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"forward-{self._name}")
        commit = functools.partial(commit_batch, finalize=self._finalize, metrics=self._metrics)
        self._commits = CommitStage(commit, name=self._name)
        self._collector = asyncio.create_task(self._collect(), name=f"batcher-{self._name}")

    @property
    def idle(self) -> bool:
        """Nothing queued and no batch staged, running or committing."""
        return not self._in_flight and len(self.queue) == 0

    # ---- admission and waiting
    def expected_wait_s(self, key_id: int, priority: str, tokens: int, weight: float) -> float:
        """How long a request of `key_id` with `tokens` would wait before its forward ends, queued now."""
        now = time.monotonic()
        ahead = self.queue.tokens_ahead(key_id, priority, tokens, weight)
        busy = max(0.0, self._step.busy_until - now)
        slowdown = 1.0  # other keys' batches run inside the forwards, while other keys send
        if self._yields is not None:
            slowdown = self._yields.slowdown(shared=self._senders.besides(key_id, now, self.queue.key_tokens))
        return (busy + self.compute.seconds(ahead + tokens)) * slowdown + COMMIT_S_MARGIN

    async def submit(
        self,
        decoded: DecodedInput,
        context: Any = None,
        *,
        key_id: int = 0,
        key_name: str = "",
        weight: float = 1.0,
        priority: str = DEFAULT_PRIORITY,
        deadline: float | None = None,
    ) -> JobResult:
        """Queue one request of API key `key_id` and wait for its logits (committed by `finalize` before this
        returns). `weight` and `priority`: the key's share (scheduler.py); `deadline`: when the caller gives up."""
        if self._changed is None or self._closing:
            raise ServiceUnavailableError("the server is shutting down; retry on another instance")
        job = BatchJob(
            decoded,
            self.tokens_of(decoded),
            context,
            asyncio.get_running_loop().create_future(),
            key_id=key_id,
            key_name=key_name,
            weight=weight,
            priority=priority,
            deadline=deadline,
        )
        # larger than a batch may hold: chunks in consecutive batches, other keys' requests served between them (a
        # key alone may hold up to 1 s of forward: _batch_tokens)
        self._senders.sent(key_id, time.monotonic())
        chunks = split_job(
            job, budget=self._batch_tokens(), prefix=self._prefix, seconds=self.compute.seconds, sizes=self._chunk_sizes
        )
        if len(chunks) > 1 and self._metrics:
            self._metrics.split_requests.labels(model=self._name).inc()
            self._metrics.split_chunks.labels(model=self._name).inc(len(chunks))
        for queued in chunks:
            self.queue.push(queued)
            self._count_queued(queued, 1)
            if self._backlog is not None:
                self._backlog.taken(rank_of(priority))
        self._changed.set()
        return await job.future

    async def close(self) -> None:
        """Stop taking requests, run everything already queued, then stop the threads."""
        if self._changed is None or self._closing:
            return
        self._closing = True
        self._changed.set()
        if self._collector is not None:
            await self._collector
        while self._in_flight:
            await asyncio.gather(*list(self._in_flight), return_exceptions=True)
        if self._commits is not None:
            await self._commits.close()
        for pool in (self._stage_pool, self._forward_pool):
            if pool is not None:
                pool.shutdown(wait=True)

    def _let_go(self, jobs: Sequence[BatchJob]) -> None:
        """Tell the backlog that these requests leave unrun (dropped, or their caller gone)."""
        if self._backlog is not None and jobs:
            self._backlog.let_go([rank_of(job.priority) for job in jobs])

    def _count_queued(self, job: BatchJob, change: int) -> None:
        if self._metrics and job.ends_request:  # a split request counts once, until its last chunk leaves
            self._metrics.queue_depth.inc(change)
            self._metrics.key_queue_depth.labels(key=self._metrics.key_label(job.key_name)).inc(change)

    # ---- forming batches (event loop)
    def _full(self) -> bool:
        return self.queue.images >= self._max_images or self.queue.tokens >= self._batch_tokens()

    async def _wait_changed(self, timeout: float | None) -> None:
        assert self._changed is not None
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    async def _collect(self) -> None:
        assert self._slots is not None
        while True:
            self._announce_head()
            if not len(self.queue):
                if self._closing:
                    return
                await self._wait_changed(None)
                continue
            # The next batch forms only as the forward is about to be free (its expected end minus the time staging
            # takes): a request arriving meanwhile, of any key, can still be in it, so a light key waits behind at
            # most the batch running, not also one staged ahead of it.
            # Nor does it form while one formed batch still waits for its forward to start (being staged): the
            # running forward's end is not known yet, and a full queue would otherwise stage two batches ahead.
            lead = 2 * self._stage_s + STAGE_LEAD_S
            busy_left = self._step.busy_until - time.monotonic()
            if not self._closing and (busy_left > lead or self._waiting_forward):
                # ...but a batch of other keys may run between the running forward's blocks
                running = None if self._waiting_forward else self._preemptible(busy_left)
                if running is None:
                    await self._wait_changed(busy_left - lead if not self._waiting_forward else None)
                    continue
                await self._slots.acquire()
                budget = min(self._batch_tokens(), self.compute.tokens_within(busy_left))
                batch = self._next_batch(budget, start_delay=0.0, exclude=running.keys, max_rank=running.rank)
                self._launch(*batch, nested=True)
                continue
            due = self.queue.oldest_enqueued() + self._max_delay_s
            # A batch forms when full, or when its first request waited long enough. Closing: everything goes now.
            if not (self._closing or self._full() or time.monotonic() >= due):
                await self._wait_changed(max(0.0, due - time.monotonic()))
                continue
            await self._slots.acquire()
            self._launch(*self._next_batch(self._batch_tokens()), nested=False)

    def _announce_head(self) -> None:
        """An ingest worker tells the device which request its queue would take next, on every turn of this loop
        (after requests came, after a batch formed): the device waits for a worker whose head goes first."""
        if self._backlog is not None:
            head = self.queue.head()
            self._backlog.queue_head(None if head is None else (rank_of(head.priority), head.key_id))

    def _preemptible(self, busy_left: float) -> RunningBatch | None:
        """The running batch, when a batch to run between its forward's blocks is to form now (preemption.py): the
        next request by fair order of the keys not in it is of no worse class and runs in less than what is left of
        the running forward, which has more than PREEMPT_MIN_S left; a buffer slot is free. Else None."""
        running, slots = self._step.running, self._slots  # the forward thread may end it meanwhile: read once
        assert slots is not None
        if self._yields is None or running is None or self._closing or slots.locked():
            return None
        head = self.queue.head(running.keys)
        if head is None or rank_of(head.priority) > running.rank:
            return None
        return running if busy_left > max(PREEMPT_MIN_S, self.compute.seconds(head.tokens)) else None

    def _launch(self, batch: list[BatchJob], dropped: list[BatchJob], *, nested: bool) -> None:
        """Start the pipeline of a batch just formed (its buffer slot acquired); `nested`: offered to run between
        the running forward's blocks."""
        assert self._slots is not None
        self._refuse_late(dropped)
        if not batch:
            self._slots.release()
            return
        for job in batch:
            self._count_queued(job, -1)
        if self._backlog is not None:
            self._backlog.formed(*batch_order(batch))
        ticket = object()
        self._waiting_forward.add(ticket)
        run = asyncio.ensure_future(self._run_batch(batch, ticket, nested=nested))
        self._in_flight.add(run)
        self.batches_started += 1
        run.add_done_callback(self._in_flight.discard)

    def _next_batch(
        self,
        token_budget: int,
        *,
        start_delay: float | None = None,
        exclude: frozenset[int] = frozenset(),
        max_rank: int | None = None,
    ) -> tuple[list[BatchJob], list[BatchJob]]:
        """(the next batch of at most `token_budget` tokens, the requests dropped for their deadline), its forward
        starting in `start_delay` seconds (None: when the running one ends), of keys not in `exclude` and classes
        ranked `max_rank` or better."""
        now = time.monotonic()
        if start_delay is None:
            start_delay = max(0.0, self._step.busy_until - now)
        gone: list[BatchJob] = []  # callers that went away while queued: dropped silently

        def live(job: BatchJob) -> bool:
            if job.caller_gone:
                gone.append(job)
                return False
            return True

        batch, dropped = self.queue.next_batch(
            max_images=self._max_images,
            token_budget=token_budget,
            now=now,
            finish_s=lambda tokens: start_delay + self.compute.seconds(tokens) + COMMIT_S_MARGIN,
            live=live,
            exclude=exclude,
            max_rank=max_rank,
        )
        for job in gone:
            self._count_queued(job, -1)
        self._let_go(gone)
        return batch, dropped

    def _shared(self) -> bool:
        """Whether another key shares the teacher now (split_requests.RecentSenders); an ingest worker, which cannot
        see the other workers' keys, always assumes so."""
        return self._backlog is not None or self._senders.several(time.monotonic(), self.queue.key_tokens)

    def _batch_tokens(self) -> int:
        """The token budget, cut to what the forward runs by the running estimate in `max_batch_s` while another key
        shares the teacher (a batch never holds the teacher so long that another key's request waits for more than
        about that), in `LONE_BATCH_S` while a key is alone (one starting to send waits about that long at most)."""
        if self._max_batch_s <= 0:
            return self._token_budget
        bound_s = self._max_batch_s if self._shared() else max(self._max_batch_s, LONE_BATCH_S)
        return max(1, min(self._token_budget, self.compute.tokens_within(bound_s)))

    def _refuse_late(self, dropped: Sequence[BatchJob], *, queued: bool = True) -> None:
        if queued:
            self._let_go(dropped)
        for job in dropped:
            if queued:
                self._count_queued(job, -1)
            if not job.future.done():
                retry_s = self.compute.seconds(self.queue.key_tokens(job.key_id) + job.tokens)
                job.future.set_exception(DeadlineUnmetError.dropped_unrun(retry_s))
                if self._metrics:
                    self._metrics.count_shed(reason="deadline_queue", key=job.key_name)

    # ---- the pipeline: stage -> forward -> commit
    async def _run_batch(self, batch: list[BatchJob], ticket: object, *, nested: bool = False) -> None:
        loop = asyncio.get_running_loop()
        assert self._slots is not None and self._stage_pool and self._forward_pool and self._commits
        slot = None
        live = [j for j in batch if not j.caller_gone]  # callers that went away before staging: not run, not billed
        handoff = Handoff()
        try:
            if not live:
                return
            slot = self._stager.acquire()  # free: the slot semaphore admitted this batch
            rows = await loop.run_in_executor(self._stage_pool, self._stage, live, slot)
            hook = functools.partial(loop.call_soon_threadsafe, self._forward_started, ticket)
            refuse = functools.partial(loop.call_soon_threadsafe, functools.partial(self._refuse_late, queued=False))
            # From the forward's start the batch runs and is billed, also for a caller leaving then: its answer waits
            # for a replay.
            run = functools.partial(self._step.run, live, rows, hook, refuse, handoff)
            if nested:
                forwarded = await self._offer(run, sum(j.tokens for j in live))
            else:
                forwarded = await loop.run_in_executor(self._forward_pool, run)
            await self._commits.wait_for_room()  # a ledger slower than the teacher holds the slot: back-pressure
        except Exception as exc:  # noqa: BLE001 - delivered to every caller of the batch; nothing was committed
            deliver_error(live, exc)
            return
        finally:
            self._forward_started(ticket)
            handled = {id(j) for j in handoff.settled}
            self._let_go([j for j in batch if id(j) not in handled])
            if self._backlog is not None and not handoff.sent:
                self._backlog.abandoned()
            if slot is not None:
                self._stager.release(slot)
            self._slots.release()
            assert self._changed is not None
            self._changed.set()  # a free slot: a batch of other keys may now run inside the running forward
        if forwarded is None:
            return
        if isinstance(forwarded, BaseException):
            deliver_error(live, forwarded)
            return
        done = self._commits.submit(forwarded)
        done.add_done_callback(functools.partial(deliver, forwarded.jobs))
        await asyncio.gather(done, return_exceptions=True)

    async def _offer(self, run: Callable[..., Forwarded | BaseException | None], tokens: int) -> Any:
        """Run a staged batch of `tokens` at the running forward's next block boundary where its callers can wait,
        else on the forward thread's queue after it (preemption.py)."""
        assert self._yields is not None and self._forward_pool is not None

        def run_offered(nested: bool) -> Forwarded | BaseException | None:
            if nested and self._metrics:
                self._metrics.preempting_batches.labels(model=self._name).inc()
            return run(nested=nested)

        offer = Offer(run_offered, functools.partial(self._step.fits_inside, tokens))
        self._yields.offer(offer)
        self._forward_pool.submit(offer.run_unless_taken)
        return await asyncio.wrap_future(offer.result)

    def _stage(self, jobs: list[BatchJob], slot: int) -> StagedRows:
        started = time.monotonic()
        with self._stage_clock("stage"):
            rows = self._stager.stage([j.input for j in jobs], slot)
        self._stage_s = 0.8 * self._stage_s + 0.2 * (time.monotonic() - started)
        return rows

    def _wake_from_thread(self) -> None:
        """Another thread: the batch former looks again (a forward ended)."""
        if self._loop is not None and self._changed is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: the server is gone, nobody forms batches
                self._loop.call_soon_threadsafe(self._changed.set)

    def _forward_started(self, ticket: object) -> None:
        """Event loop: the batch of `ticket` no longer waits for the forward (it started, or will not run)."""
        if ticket in self._waiting_forward:
            self._waiting_forward.discard(ticket)
            assert self._changed is not None
            self._changed.set()
