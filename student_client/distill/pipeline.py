"""Paper App. E pipelining: the teacher works on micro-batch i while the student computes micro-batch i+1.

The batch is split into M micro-batches. For each: the student forward (SIPS captured on the way), patch selection,
and an asynchronous teacher request; then on to the next micro-batch. Only after the last student forward are the
teacher answers gathered, so the teacher's time on micro-batches 0..M-2 hides behind the student's later forwards.
One backward runs on the whole batch afterwards (one DDP gradient sync per step).

Overlap achieved = the fraction of the teacher's wall time (union of [submit, answered] intervals) during which the
student was not blocked waiting for it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import torch

from student_client.errors import TeacherUnavailableError
from student_client.transport.wire import Usage

InferFuture = Future  # Future[(logits [b, classes], Usage)]
Submit = Callable[..., InferFuture]  # submit(images=..., keep_indices=..., request_id=...) -> Future


@dataclass
class TeacherRequest:
    images: torch.Tensor  # [b, C, H, W] un-normalized, exactly what the student saw
    keep_indices: torch.Tensor | None  # [b, K] on the teacher's grid, where the student made them; None: the full image
    keep_counts: torch.Tensor | None = None  # [b] ragged rows (`--keep-mass`): row i uses its first counts[i]
    outputs: tuple[str, ...] = ()  # extra teacher outputs asked for (`--kd manifold|attention`)


@dataclass
class OverlapStats:
    teacher_s: float = 0.0  # wall time the teacher had work outstanding (union of request intervals)
    wait_s: float = 0.0  # time the student sat blocked on teacher answers
    student_s: float = 0.0  # student forward + selection time inside the pipeline
    requests: int = 0

    @property
    def overlap(self) -> float:
        """Fraction of teacher wall time hidden behind student compute, in [0, 1] (1 when there was none)."""
        if self.teacher_s <= 0:
            return 1.0 if self.requests == 0 else 0.0
        return min(1.0, max(0.0, 1.0 - self.wait_s / self.teacher_s))

    def __add__(self, other: OverlapStats) -> OverlapStats:
        return OverlapStats(
            self.teacher_s + other.teacher_s,
            self.wait_s + other.wait_s,
            self.student_s + other.student_s,
            self.requests + other.requests,
        )


@dataclass
class PipelineResult:
    outputs: list[Any]  # student outputs per micro-batch
    teacher_logits: list[torch.Tensor] | None  # per micro-batch; None without a teacher
    usage: Usage = field(default_factory=Usage)
    stats: OverlapStats = field(default_factory=OverlapStats)
    teacher_outputs: list[dict[str, torch.Tensor]] = field(default_factory=list)  # per micro-batch, extra outputs


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


class _Timed:
    """Records when a future was submitted and answered (the answer time comes from a done-callback)."""

    def __init__(self, fut: InferFuture) -> None:
        self.start = time.perf_counter()
        self.end: float | None = None
        self.fut = fut
        self._done = threading.Event()
        fut.add_done_callback(self._mark)

    def _mark(self, _: InferFuture) -> None:
        self.end = time.perf_counter()
        self._done.set()

    def result(self, timeout_s: float | None) -> tuple[Any, float]:
        t0 = time.perf_counter()
        try:
            value = self.fut.result(timeout=timeout_s)
        except FutureTimeout:
            raise TeacherUnavailableError(f"no teacher answer within {timeout_s:.0f}s") from None
        self._done.wait(1.0)
        return value, time.perf_counter() - t0


def pipelined_forward(
    micro_batches: list[torch.Tensor],
    student_step: Callable[[int, torch.Tensor], tuple[Any, TeacherRequest | None]],
    submit: Submit | None,
    *,
    request_id: Callable[[int], str] | None = None,
    early_requests: list[TeacherRequest] | None = None,
    timeout_s: float | None = None,
) -> PipelineResult:
    """Run `student_step(i, x_i)` per micro-batch, overlapping teacher calls with the following micro-batches.

    student_step returns (student output, the TeacherRequest for this micro-batch or None). `early_requests`, when
    given, are submitted before any student work (mask-student mode: the teacher sees full images and does not need
    SIPS), so the teacher's whole time can hide behind the student's.
    """
    stats = OverlapStats()
    timed: list[_Timed | None] = [None] * len(micro_batches)

    def send(i: int, req: TeacherRequest) -> None:
        assert submit is not None
        kwargs: dict[str, Any] = {"images": req.images, "keep_indices": req.keep_indices}
        if req.keep_counts is not None:
            kwargs["keep_counts"] = req.keep_counts
        if req.outputs:
            kwargs["outputs"] = req.outputs
        if request_id is not None:
            kwargs["request_id"] = request_id(i)
        timed[i] = _Timed(submit(**kwargs))

    if early_requests is not None and submit is not None:
        for i, early in enumerate(early_requests):
            send(i, early)
    outputs: list[Any] = []
    for i, x in enumerate(micro_batches):
        t0 = time.perf_counter()
        output, req = student_step(i, x)
        stats.student_s += time.perf_counter() - t0
        outputs.append(output)
        if req is not None and submit is not None and timed[i] is None:
            send(i, req)
    if submit is None or all(t is None for t in timed):
        return PipelineResult(outputs, None, Usage(), stats)

    logits: list[torch.Tensor] = []
    extras: list[dict[str, torch.Tensor]] = []
    usage = Usage()
    for t in timed:
        if t is None:
            raise RuntimeError("every micro-batch needs a teacher request once one has one")
        answer, waited = t.result(timeout_s)
        lg, u = answer
        stats.wait_s += waited
        logits.append(lg)
        extras.append(getattr(answer, "outputs", {}))  # an InferResult carries them; a known answer has none
        usage = usage + u
    stats.requests = len(timed)
    stats.teacher_s = _union_length([(t.start, t.end if t.end is not None else t.start) for t in timed if t])
    return PipelineResult(outputs, logits, usage, stats, extras)
