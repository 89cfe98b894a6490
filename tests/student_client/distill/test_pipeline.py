"""App. E pipelining: teacher calls overlap the following micro-batches, and the measured overlap says so."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
import torch

from student_client.distill.pipeline import OverlapStats, TeacherRequest, pipelined_forward
from student_client.transport.wire import Usage

pytestmark = pytest.mark.dtype("float32")  # compared with float32 references, on the CPU

STUDENT_S = 0.06  # per micro-batch
TEACHER_S = 0.06  # per request, one at a time (a single teacher device)


def slow_teacher(pool: ThreadPoolExecutor, calls: list[tuple[float, str]]):  # type: ignore[no-untyped-def]
    """Stands in for the remote teacher (timing only): answers after TEACHER_S, one request at a time."""

    def run(images: torch.Tensor, keep_indices: torch.Tensor | None) -> tuple[torch.Tensor, Usage]:
        time.sleep(TEACHER_S)
        return images.mean(dim=(1, 2, 3))[:, None].repeat(1, 10), Usage(images=len(images), gflops=1.0, requests=1)

    def submit(images: torch.Tensor, keep_indices: torch.Tensor | None = None, request_id: str = "") -> Future:
        calls.append((time.perf_counter(), request_id))
        return pool.submit(run, images, keep_indices)

    return submit


def student_step(i: int, x: torch.Tensor) -> tuple[torch.Tensor, TeacherRequest]:
    time.sleep(STUDENT_S)
    return x.sum(dim=(1, 2, 3)), TeacherRequest(x, torch.zeros(len(x), 4, dtype=torch.long))


def run(micro: int) -> tuple[OverlapStats, list[tuple[float, str]], list[torch.Tensor], torch.Tensor]:
    x = torch.rand(8, 3, 4, 4)
    calls: list[tuple[float, str]] = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        result = pipelined_forward(
            list(x.tensor_split(micro)), student_step, slow_teacher(pool, calls), request_id=lambda i: f"m{i}"
        )
    assert result.teacher_logits is not None and result.usage.images == 8 and result.usage.requests == micro
    return result.stats, calls, result.teacher_logits, x


def test_teacher_overlaps_later_micro_batches() -> None:
    stats, calls, logits, x = run(4)
    assert [rid for _, rid in calls] == ["m0", "m1", "m2", "m3"]
    # micro-batch i+1's student work starts before i's teacher answer is needed: submissions are spread out
    assert calls[1][0] - calls[0][0] >= STUDENT_S * 0.9
    # teacher logits come back in micro-batch order, one row per image
    torch.testing.assert_close(torch.cat(logits)[:, 0], x.mean(dim=(1, 2, 3)))
    # 3 of the 4 teacher calls ran while the student computed: most of the teacher's time is hidden
    assert stats.overlap > 0.5, stats
    assert stats.teacher_s >= 4 * TEACHER_S * 0.9


def test_a_single_micro_batch_cannot_overlap() -> None:
    stats, calls, _, _ = run(1)
    assert len(calls) == 1
    assert stats.overlap < 0.3, stats  # the student has nothing left to do while the teacher runs
    assert stats.wait_s >= TEACHER_S * 0.8


def test_without_teacher_requests_nothing_is_submitted() -> None:
    out = pipelined_forward([torch.ones(2, 3, 4, 4)], lambda i, x: (x.sum(), None), None)
    assert out.teacher_logits is None and out.stats.requests == 0 and out.stats.overlap == 1.0
