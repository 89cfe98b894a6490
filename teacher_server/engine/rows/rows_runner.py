"""Running a staged micro-batch: the teacher on its rows, one `Answer` per request.

Logits only: the configured fast path (`bucket` runs each keep count unpadded, `pad` pads and masks, `pack` packs
ragged rows without padding). When any request asks for extra outputs: one padded forward computing everything the
batch asks for (answers.py). The batcher calls `answers` in its forward thread; with ingest workers the device process
calls it on rows a worker staged in shared memory (ingest/).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from maskedkd.teacher_outputs import ForwardOutputs, OutputChoice
from maskedkd.v1 import teacher_pb2 as pb
from teacher_server.engine.rows.answers import NO_OUTPUTS, Answer, OutputsRequest, batch_choice, job_outputs
from teacher_server.engine.rows.staging import StagedRows
from teacher_server.priorities import DEFAULT_PRIORITY, rank_of

# forward(pixels [G,K,C,P,P] raw, keep_indices [G,K], keep_counts [G] | None) -> logits [G, classes] float32 CPU
ForwardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
# the same with extra outputs (answers.py): ragged rows padded and masked, one call per batch
OutputsForwardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, OutputChoice], ForwardOutputs]
MixedK = Literal["bucket", "pad", "pack"]

DEFAULT_RANK = rank_of(DEFAULT_PRIORITY)


@dataclass(frozen=True)
class JobShape:
    """What the forward needs to know of one request of the batch: its rows follow the previous request's."""

    images: int
    k: int  # its keep width (the batch is as wide as its widest request)
    outputs: OutputsRequest = NO_OUTPUTS
    deadline: float | None = None  # time.monotonic() its caller gives up (one clock for every process of the host)
    rank: int = DEFAULT_RANK  # its key's priority class (priorities.rank_of): the device process runs better first
    tag: float = 0.0  # its fair-queuing start tag (the clock ingest workers share): then smaller first


@dataclass(frozen=True)
class Late:
    """A request not run: its caller would have given up before the forward ended (found where the forward runs)."""

    forward_s: float  # that forward's expected length, by the estimate of the process that runs it


class AnswersFn(Protocol):
    """The batcher's way to run a staged batch (RowsRunner here, ingest.remote_rows.RemoteRows across processes)."""

    stage: str  # the metrics stage its CPU time counts to in the calling process
    runs_here: bool  # the teacher runs in this process (it observes the batch metrics: size, tokens, seconds)

    def answers(self, rows: StagedRows, jobs: Sequence[JobShape]) -> Sequence[Answer | Late]:
        """Each request's answer, in order, or `Late` (the device process checks the deadlines again as its forward
        starts, after waiting for other workers' batches)."""
        ...


def run_bucketed(forward: ForwardFn, rows: StagedRows) -> torch.Tensor:
    """One forward per distinct keep count, rows trimmed to their count: no padding at all."""
    if rows.uniform:
        return forward(rows.pixels, rows.indices, None)
    counts_list = rows.counts.tolist()
    out: torch.Tensor | None = None
    for k in sorted(set(counts_list)):
        select = torch.tensor([i for i, c in enumerate(counts_list) if c == k], device=rows.pixels.device)
        logits = forward(rows.pixels[select, :k], rows.indices[select, :k], None)  # [G, classes]
        if out is None:
            out = torch.empty(len(counts_list), logits.shape[1], dtype=logits.dtype)
        out[select.cpu()] = logits
    assert out is not None
    return out


def run_padded(forward: ForwardFn, rows: StagedRows) -> torch.Tensor:
    """One forward over all rows padded to the longest count, padding masked out."""
    return forward(rows.pixels, rows.indices, None if rows.uniform else rows.counts.to(rows.pixels.device))


class RowsRunner:
    """The teacher in this process: `answers(rows, jobs)` runs the rows and splits the result per request."""

    stage = "forward"
    runs_here = True

    def __init__(
        self,
        forward: ForwardFn,
        *,
        mixed_k: MixedK = "bucket",
        forward_outputs: OutputsForwardFn | None = None,
        served_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.forward = forward
        self.forward_outputs = forward_outputs  # None: requests asking for outputs were refused at decode
        self.served_dtype = served_dtype
        self.run_rows = run_padded if mixed_k in ("pad", "pack") else run_bucketed  # pack: the forward packs

    def answers(self, rows: StagedRows, jobs: Sequence[JobShape]) -> list[Answer]:
        return split_answers(*self.run(rows, jobs), jobs)

    def run(self, rows: StagedRows, jobs: Sequence[JobShape]) -> tuple[torch.Tensor, list[pb.Outputs | None]]:
        """(the batch's logits [sum B, classes] float32 CPU, each request's extra outputs or None)."""
        choice = batch_choice([j.outputs for j in jobs])
        if not choice.any:
            return self.run_rows(self.forward, rows), [None] * len(jobs)
        assert self.forward_outputs is not None  # decode refuses outputs the served model cannot give
        counts = None if rows.uniform else rows.counts.to(rows.pixels.device)
        out = self.forward_outputs(rows.pixels, rows.indices, counts, choice)
        extras, start = [], 0
        for job in jobs:
            part = slice(start, start + job.images)
            extras.append(job_outputs(out, part, job.k, job.outputs, self.served_dtype))
            start += job.images
        return out.logits.float().cpu(), extras


def split_answers(logits: torch.Tensor, outputs: Sequence[pb.Outputs | None], jobs: Sequence[JobShape]) -> list[Answer]:
    """Each request's answer: its rows of the batch's logits [sum B, classes] (views) and its extra outputs."""
    parts = torch.split(logits, [j.images for j in jobs])
    return [Answer(part, extra) for part, extra in zip(parts, outputs, strict=True)]
