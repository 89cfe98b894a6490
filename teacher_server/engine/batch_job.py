"""What the micro-batcher (batcher.py) queues and hands back: a request waiting for the teacher, its result, the
figures of the batch it ran in, and the commit hook's signature."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from teacher_server.engine.answers import Answer
from teacher_server.engine.decode import DecodedInput
from teacher_server.priorities import DEFAULT_PRIORITY


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

    @property
    def images(self) -> int:
        return self.input.images


@dataclass
class JobResult:
    logits: torch.Tensor  # [B, classes] float32 CPU
    queue_s: float
    stats: BatchStats
    finalized: Any  # what `finalize` returned for this job
    outputs: Any = None  # pb.Outputs: the extra outputs the request asked for (None: logits only)


# finalize(jobs, answer per job, stats) -> one value per job; runs in the commit thread after the forward.
FinalizeFn = Callable[[Sequence[BatchJob], Sequence[Answer], BatchStats], Sequence[Any]]
