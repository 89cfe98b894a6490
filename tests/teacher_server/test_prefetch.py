"""The next micro-batch is staged while the current forward runs; a caller that leaves after staging is not run."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest
import timm
import torch
from service_testkit import random_keep

from maskedkd.masked_teacher import MaskedTeacher
from teacher_server.engine.batcher import TokenBudgetBatcher, concat_jobs, run_bucketed, run_padded
from teacher_server.engine.prefetch import Prefetcher
from teacher_server.engine.preprocess import PreparedInput
from teacher_server.engine.served_model import make_forward

pytestmark = [pytest.mark.dtype("float32"), pytest.mark.timeout(60)]


class SlowSumForward:
    """logit = sum of each row's patch values; each call takes `seconds` and records (start, end, rows)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.calls: list[tuple[float, float, int]] = []

    def __call__(self, patches: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
        start = time.monotonic()
        time.sleep(self.seconds)
        self.calls.append((start, time.monotonic(), patches.shape[0]))
        return patches.flatten(1).sum(-1, keepdim=True)  # [G, 1]


def rows(batch: int, fill: float) -> PreparedInput:
    return PreparedInput(
        patches=torch.full((batch, 4, 1, 2, 2), fill),
        keep_indices=random_keep(batch, 4, seed=1),
        keep_counts=torch.tensor([4] * batch),
    )


def batcher(fwd: SlowSumForward) -> tuple[TokenBudgetBatcher, list[float]]:
    b = TokenBudgetBatcher(fwd, num_prefix_tokens=1, token_budget=10_000, max_batch_images=4, max_delay_s=0.05)
    staged_at: list[float] = []
    stage = b._prefetch._stage

    def spy(jobs):  # type: ignore[no-untyped-def]
        staged_at.append(time.monotonic())
        assert threading.current_thread().name.startswith("prefetch-")
        return stage(jobs)

    b._prefetch._stage = spy  # type: ignore[method-assign]
    return b, staged_at


async def test_a_full_batch_is_staged_during_the_running_forward() -> None:
    fwd = SlowSumForward(0.5)
    b, staged_at = batcher(fwd)
    await b.start()
    first = asyncio.ensure_future(b.submit(rows(4, 1.0)))  # fills the cap: sealed at once
    await asyncio.sleep(0.1)
    second = [asyncio.ensure_future(b.submit(rows(2, v))) for v in (2.0, 3.0)]  # fill the cap while the first runs
    results = await asyncio.gather(first, *second)
    await b.close()
    (s1, e1, n1), (_, _, n2) = fwd.calls
    assert (n1, n2) == (4, 4)
    assert len(staged_at) == 1 and s1 < staged_at[0] < e1  # staged while the first forward was running
    for r, fill, n in zip(results, (1.0, 2.0, 3.0), (4, 2, 2), strict=True):
        assert torch.equal(r.logits, torch.full((n, 1), fill * 16))


async def test_a_caller_gone_after_staging_is_not_run() -> None:
    fwd = SlowSumForward(0.5)
    b, staged_at = batcher(fwd)
    await b.start()
    first = asyncio.ensure_future(b.submit(rows(4, 1.0)))
    await asyncio.sleep(0.1)
    leaving = asyncio.ensure_future(b.submit(rows(2, 2.0)))
    staying = asyncio.ensure_future(b.submit(rows(2, 3.0)))
    await asyncio.sleep(0.1)
    assert len(staged_at) == 1  # staged with both callers
    leaving.cancel()
    await first
    result = await staying
    await b.close()
    assert [n for _, _, n in fwd.calls] == [4, 2]  # the staged rows were dropped; only the live caller ran
    assert torch.equal(result.logits, torch.full((2, 1), 3.0 * 16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.dtype("float32", device="cuda")
@torch.inference_mode()
def test_cuda_rows_staged_on_the_device_run_through_the_served_forward() -> None:
    """Under load the prefetcher hands the forward rows already on the GPU (the forward used to pin them: pinning a
    CUDA tensor raises, and every request of such a batch failed with INTERNAL). Mixed keep counts, both ways of
    running them, against the same rows concatenated on the host."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, num_classes=10)
    teacher = MaskedTeacher(model.to("cuda").eval())
    forward = make_forward(teacher, torch.device("cuda"), torch.float32)
    g = torch.Generator().manual_seed(0)
    jobs = [
        SimpleNamespace(
            prepared=PreparedInput(
                patches=torch.randn(b, k, 3, 4, 4, generator=g),
                keep_indices=random_keep(b, k, seed=k),
                keep_counts=torch.full((b,), k),
            )
        )
        for b, k in ((3, 32), (2, 16), (4, 32))
    ]
    prefetcher = Prefetcher(concat_jobs, torch.device("cuda"))
    staged = prefetcher.take(prefetcher.start(jobs), jobs)
    prefetcher.close()
    assert staged is not None and all(t.is_cuda for t in staged)
    for run in (run_bucketed, run_padded):
        expected = run(forward, *concat_jobs(jobs))  # host rows, pinned and copied by the forward
        torch.testing.assert_close(run(forward, *staged), expected, atol=1e-4, rtol=1e-4)
