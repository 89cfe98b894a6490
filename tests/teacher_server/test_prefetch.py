"""The next micro-batch is staged while the current forward runs; a caller that leaves after staging is not run."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from service_testkit import random_keep

from teacher_server.batcher import TokenBudgetBatcher
from teacher_server.preprocess import PreparedInput

pytestmark = pytest.mark.timeout(60)


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
    return PreparedInput(patches=torch.full((batch, 4, 1, 2, 2), fill), keep_indices=random_keep(batch, 4, seed=1),
                         keep_counts=torch.tensor([4] * batch))


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
    for r, fill, n in zip(results, (1.0, 2.0, 3.0), (4, 2, 2)):
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
