"""What the micro-batcher (batcher.py) queues and hands back: a request waiting for the teacher (or a chunk of one
larger than a batch, split_requests.py), its result, the figures of the batch it ran in, the commit hook's signature,
and what the forward thread tells an ingest worker's backlog."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from teacher_server.engine.rows.answers import Answer, joined_answer
from teacher_server.engine.rows.decode import DecodedInput
from teacher_server.engine.rows.rows_runner import JobShape
from teacher_server.priorities import DEFAULT_PRIORITY, rank_of


@dataclass
class BatchStats:
    images: int  # images in the micro-batch
    tokens: int  # teacher tokens in the micro-batch
    compute_s: float  # forward time
    started_at: float  # time.monotonic() when the forward began


@dataclass
class BatchJob:
    """One request waiting in the queue."""

    input: DecodedInput
    tokens: int  # sum over rows of keep_count + prefix tokens
    context: Any  # opaque to the batcher; handed to `finalize`
    future: asyncio.Future[JobResult]
    key_id: int = 0
    key_name: str = ""  # for the per-key metrics
    weight: float = 1.0
    priority: str = DEFAULT_PRIORITY
    deadline: float | None = None  # monotonic time the caller gives up
    enqueued_at: float = field(default_factory=time.monotonic)
    start_tag: float = 0.0  # its fair-queuing start tag, set as it is taken into a batch
    part: ChunkOf | None = None  # a chunk of a request too large for one batch (split_requests.py); None: whole

    @property
    def ends_request(self) -> bool:
        """Leaving the queue, it ends its request's time there (a whole request, or the last chunk of one)."""
        return self.part is None or self.part.last

    @property
    def leads_batch(self) -> bool:
        """A chunk joins a batch only as its first request (scheduler.py)."""
        return self.part is not None

    @property
    def images(self) -> int:
        return self.input.images

    @property
    def caller_gone(self) -> bool:
        """Its caller will not take an answer any more (its future done: a flag the event loop sets; read from any
        thread)."""
        return self.future.done()

    @property
    def shape(self) -> JobShape:
        """What the forward needs to know of it (rows_runner.py)."""
        i = self.input
        return JobShape(i.images, i.k, i.outputs, self.deadline, rank_of(self.priority), self.start_tag)


@dataclass(eq=False)
class SplitRequest:
    """A request larger than a batch, run as `count` chunks (split_requests.py); collects their answers until the
    last one."""

    job: BatchJob  # the request as submitted: its whole input, its caller's future, its billing context
    count: int
    answers: dict[int, Answer] = field(default_factory=dict)

    def add(self, index: int, answer: Answer) -> Answer | None:
        """Keep chunk `index`'s answer; the request's whole answer once every chunk has one, else None."""
        self.answers[index] = answer
        if len(self.answers) < self.count:
            return None
        return joined_answer([self.answers[i] for i in range(self.count)])


@dataclass(frozen=True, eq=False)
class ChunkOf:
    """Where a queued chunk belongs: its request and its place in it."""

    request: SplitRequest
    index: int

    @property
    def last(self) -> bool:
        return self.index == self.request.count - 1


@dataclass
class JobResult:
    logits: torch.Tensor  # [B, classes] float32 CPU
    queue_s: float
    stats: BatchStats
    finalized: Any  # what `finalize` returned for this job
    outputs: Any = None  # pb.Outputs: the extra outputs the request asked for (None: logits only)


# finalize(jobs, answer per job, stats) -> one value per job; runs in the commit thread after the forward.
FinalizeFn = Callable[[Sequence[BatchJob], Sequence[Answer], BatchStats], Sequence[Any]]


@dataclass
class Handoff:
    """What the forward thread did with a batch's requests, for an ingest worker's backlog."""

    settled: list[BatchJob] = field(default_factory=list)  # handed to the teacher, or let go there
    sent: bool = False  # handed to the teacher (for a worker: its call sent, or the send failed and RemoteRows said)


def batch_order(jobs: Sequence[BatchJob]) -> tuple[int, float]:
    """Where a batch stands among the workers' batches at the device: its best priority class, and the smallest start
    tag among its requests of that class."""
    rank = min(rank_of(j.priority) for j in jobs)
    return rank, min(j.start_tag for j in jobs if rank_of(j.priority) == rank)


def still_wanted(jobs: Sequence[BatchJob], answer_by: float) -> tuple[list[BatchJob], list[BatchJob]]:
    """(the jobs to run, those whose deadline passes before `answer_by`) as the forward starts; a job whose caller
    went away (its future done: a flag set on the event loop) is in neither."""
    keep: list[BatchJob] = []
    late: list[BatchJob] = []
    for job in jobs:
        if not job.caller_gone:
            (late if job.deadline is not None and job.deadline < answer_by else keep).append(job)
    return keep, late
