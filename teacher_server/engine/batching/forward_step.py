"""The forward thread's step of the micro-batcher: a staged batch through the teacher, and what is learnt from it.

It runs on the batcher's forward thread, or, for a batch offered between two blocks of the running forward, inside
that forward (`nested`: preemption.py). At the forward's start the batch's callers are checked once more: a caller
gone, or one whose answer could no longer reach it, is not run and not billed. It keeps the estimate of when the
running forward ends (the batcher forms the next batch by it; admission estimates waits from it) and which batch runs
(what may run between its blocks), runs the teacher (rows_runner.py here, or the device process of the ingest
workers), teaches the compute estimate the forward's time, and hands the answers of whole requests on to commit.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence

import torch

from teacher_server.engine.batching.batch_job import BatchJob, BatchStats, Handoff, still_wanted
from teacher_server.engine.batching.commit_stage import Forwarded
from teacher_server.engine.batching.preemption import ForwardSpan, RunningBatch, YieldPoints
from teacher_server.engine.batching.scheduler import ComputeEstimate
from teacher_server.engine.batching.split_requests import whole_requests
from teacher_server.engine.rows.answers import Answer
from teacher_server.engine.rows.rows_runner import AnswersFn, JobShape, Late
from teacher_server.engine.rows.staging import StagedRows
from teacher_server.metrics import ServerMetrics
from teacher_server.priorities import rank_of

COMMIT_S_MARGIN = 0.05  # seconds a batch's commit and answer take after its forward, at most, for deadline checks


class ForwardStep:
    """`run` a staged batch on the forward thread; `busy_until` and `running` say what runs, for the batch former."""

    def __init__(
        self,
        runner: AnswersFn,
        *,
        compute: ComputeEstimate,
        yields: YieldPoints | None,
        metrics: ServerMetrics | None,
        let_go: Callable[[Sequence[BatchJob]], None],
        wake: Callable[[], None],
    ) -> None:
        self.runner = runner
        self.compute = compute
        self._yields = yields
        self._metrics = metrics
        self._let_go = let_go  # requests that leave unrun: the backlog is told
        self._wake = wake  # the batch former, from this thread: the forward ended
        self.busy_until = 0.0  # monotonic estimate of when the forward in progress ends
        self.running: RunningBatch | None = None  # the batch whose forward runs (not one run between its blocks)

    def fits_inside(self, tokens: int) -> bool:
        """Whether a batch of `tokens` may run inside the running forward now: its callers can wait that long."""
        running = self.running
        extra_s = self.compute.seconds(tokens)
        return running is not None and running.allows(now_until=self.busy_until, extra_s=extra_s)

    def run(
        self,
        jobs: list[BatchJob],
        rows: StagedRows,
        started_hook: Callable[[], object],
        refuse: Callable[..., object],
        handoff: Handoff,
        *,
        nested: bool = False,
    ) -> Forwarded | BaseException | None:
        """Forward thread: the teacher on the staged rows; the commit stage commits them. None: nobody to run for.
        `handoff` gets the jobs handed to the teacher and those not run (which it tells the backlog of). `nested`:
        run between two blocks of the running forward (preemption.py), which keeps its own estimates."""
        try:
            started = time.monotonic()
            if rows.ready is not None:  # the rows' copy to the device, queued on the staging stream
                torch.cuda.current_stream(rows.pixels.device).wait_event(rows.ready)
            # a caller gone since staging, or one whose answer could no longer reach it: not run, not billed
            wanted, late = still_wanted(
                jobs, started + self.compute.seconds(sum(j.tokens for j in jobs)) + COMMIT_S_MARGIN
            )
            kept = {id(j) for j in wanted}
            if len(wanted) < len(jobs):
                rows = rows.select_requests([j.images for j in jobs], [id(j) in kept for j in jobs])
            self._let_go([j for j in jobs if id(j) not in kept])
            handoff.settled.extend(jobs)
            jobs = wanted
            if late:
                refuse(late)
            if not jobs:
                started_hook()
                return None
            tokens = sum(j.tokens for j in jobs)
            if not nested:
                self._began(jobs, started + self.compute.seconds(tokens))
            started_hook()
            span = ForwardSpan()
            try:
                shapes = [j.shape for j in jobs]
                handoff.sent = True
                with torch.inference_mode(), self._context(shapes, span, nested=nested):
                    answered = self.runner.answers(rows, shapes)
            finally:
                if nested:  # the running forward ends that much later
                    self.busy_until += time.monotonic() - started
                else:
                    self._done()
            # the batches run between this forward's blocks are not its compute
            compute_s = time.monotonic() - started - span.inside_s
            ran = [(job, answer) for job, answer in zip(jobs, answered, strict=True) if isinstance(answer, Answer)]
            cut = [(job, answer) for job, answer in zip(jobs, answered, strict=True) if isinstance(answer, Late)]
            # nothing ran: the device's estimate of the forward it refused is what there is to learn
            self.compute.observe(tokens, compute_s if ran else max(compute_s, *(late.forward_s for _, late in cut)))
            if cut:  # found late where the forward runs: not run, not billed
                refuse([job for job, _ in cut])
            ran = whole_requests(ran)  # a split request's chunks wait for its last one
            if not ran:
                return None
            jobs, per_job = [job for job, _ in ran], [answer for _, answer in ran]
            stats = BatchStats(images=rows.images, tokens=tokens, compute_s=compute_s, started_at=started)
        except Exception as exc:  # noqa: BLE001 - delivered to every caller of the batch; nothing was committed
            return exc
        if self._metrics and self.runner.runs_here:  # else the device process observes its batches
            self._metrics.batch_images.observe(stats.images)
            self._metrics.batch_tokens.observe(stats.tokens)
            self._metrics.compute_seconds.observe(compute_s)
        return Forwarded(jobs, per_job, stats)

    def _began(self, jobs: Sequence[BatchJob], busy_until: float) -> None:
        """Forward thread: a batch's forward starts, to end at `busy_until` by the estimate."""
        latest = min((j.deadline for j in jobs if j.deadline is not None), default=math.inf) - COMMIT_S_MARGIN
        self.running = RunningBatch(frozenset(j.key_id for j in jobs), min(rank_of(j.priority) for j in jobs), latest)
        self.busy_until = busy_until

    def _context(self, shapes: Sequence[JobShape], span: ForwardSpan, *, nested: bool) -> contextlib.ExitStack:
        """Around a forward: its CPU counted to the runner's stage (a nested one's is counted by the forward it runs
        in), and, on a logits-only batch, the yield points where a waiting batch of other keys runs (their time
        goes to `span`)."""
        stack = contextlib.ExitStack()
        if not nested:
            if self._metrics:
                stack.enter_context(self._metrics.stage(self.runner.stage))
            if self._yields is not None and not any(s.outputs.choice.any for s in shapes):
                stack.enter_context(self._yields.preemptible(span))
        return stack

    def _done(self) -> None:
        """Forward thread: the running forward ended (the one forward thread runs one at a time, batches offered
        inside it included); the next batch may form now, also when the estimate said later."""
        self.running = None
        self.busy_until = time.monotonic()
        self._wake()
