"""TokenBudgetBatcher on its own: when batches are sealed, how rows of different keep counts run, errors, close."""

from __future__ import annotations

import asyncio

import pytest
import timm
import torch
from service_testkit import MODEL, TINY, random_keep

from maskedkd.masked_teacher import MaskedTeacher
from teacher_server.engine.batcher import TokenBudgetBatcher, run_bucketed, run_padded
from teacher_server.engine.preprocess import PreparedInput
from teacher_server.errors import ServiceUnavailableError

pytestmark = [pytest.mark.dtype("float32"), pytest.mark.timeout(60)]


class RecordingForward:
    """A real (if simple) teacher: logit = sum of the kept patch values of each row; records every call's shape."""

    def __init__(self, fail_on: float | None = None) -> None:
        self.calls: list[tuple[int, int, bool]] = []  # (rows, K, with counts)
        self.fail_on = fail_on

    def __call__(self, patches: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
        self.calls.append((patches.shape[0], patches.shape[1], counts is not None))
        if self.fail_on is not None and bool((patches == self.fail_on).any()):
            raise RuntimeError("poisoned input")
        k = patches.shape[1]
        valid = torch.ones(patches.shape[:2]) if counts is None else (torch.arange(k) < counts[:, None]).float()
        return (patches.flatten(2).sum(-1) * valid).sum(1, keepdim=True)  # [G, 1]


def prepared(batch: int, k: int, fill: float = 1.0, counts: list[int] | None = None) -> PreparedInput:
    return PreparedInput(
        patches=torch.full((batch, k, 1, 2, 2), fill),
        keep_indices=random_keep(batch, k, seed=batch * 100 + k),
        keep_counts=torch.tensor(counts if counts is not None else [k] * batch),
    )


def make(forward: RecordingForward, **kw: object) -> TokenBudgetBatcher:
    args: dict[str, object] = {
        "num_prefix_tokens": 1,
        "token_budget": 10_000,
        "max_batch_images": 64,
        "max_delay_s": 0.2,
        **kw,
    }
    return TokenBudgetBatcher(forward, **args)  # type: ignore[arg-type]


async def test_same_k_requests_concatenate_into_one_unpadded_forward() -> None:
    fwd = RecordingForward()
    b = make(fwd)
    await b.start()
    results = await asyncio.gather(*(b.submit(prepared(n, 6, fill=n)) for n in (1, 2, 3)))
    await b.close()
    assert fwd.calls == [(6, 6, False)]
    for n, r in zip((1, 2, 3), results, strict=True):
        assert r.stats.images == 6 and r.stats.tokens == 6 * 7
        assert torch.equal(r.logits, torch.full((n, 1), n * 6 * 4.0))


async def test_token_budget_and_image_cap_seal_batches() -> None:
    fwd = RecordingForward()
    b = make(fwd, token_budget=2 * 9 * 2)  # two 2-image requests of K=8 (+1 prefix) fill it
    await b.start()
    await asyncio.gather(*(b.submit(prepared(2, 8)) for _ in range(5)))
    await b.close()
    assert [rows for rows, _, _ in fwd.calls] == [4, 4, 2]

    fwd = RecordingForward()
    b = make(fwd, max_batch_images=3)
    await b.start()
    await asyncio.gather(*(b.submit(prepared(1, 4)) for _ in range(7)))
    await b.close()
    assert [rows for rows, _, _ in fwd.calls] == [3, 3, 1]


async def test_max_delay_gathers_late_arrivals_and_bounds_the_wait_of_a_lone_request() -> None:
    fwd = RecordingForward()
    b = make(fwd, max_delay_s=0.3)
    await b.start()
    first = asyncio.create_task(b.submit(prepared(1, 4)))
    await asyncio.sleep(0.1)  # well inside the delay: joins the open batch
    second = asyncio.create_task(b.submit(prepared(1, 4)))
    await asyncio.gather(first, second)
    assert fwd.calls == [(2, 4, False)]
    loop = asyncio.get_running_loop()
    started = loop.time()
    await b.submit(prepared(1, 4))
    waited = loop.time() - started
    await b.close()
    assert fwd.calls[1] == (1, 4, False) and 0.25 < waited < 5


async def test_mixed_keep_counts_bucket_or_pad() -> None:
    mixed = [prepared(2, 8, counts=[8, 3]), prepared(1, 5), prepared(2, 3)]
    for strategy, expected in (("bucket", [(3, 3, False), (1, 5, False), (1, 8, False)]), ("pad", [(5, 8, True)])):
        fwd = RecordingForward()
        b = make(fwd, mixed_k=strategy)
        await b.start()
        results = await asyncio.gather(*(b.submit(p) for p in mixed))
        await b.close()
        assert sorted(fwd.calls) == sorted(expected), strategy
        assert [r.logits.flatten().tolist() for r in results] == [[32.0, 12.0], [20.0], [12.0, 12.0]]


def test_bucketing_and_padding_match_each_request_alone_on_a_real_teacher() -> None:
    teacher = MaskedTeacher(timm.create_model(MODEL, pretrained=False, depth=3, **TINY).eval())
    g = torch.Generator().manual_seed(0)
    patches = torch.randn(6, 20, 3, 4, 4, generator=g)  # [B, K, C, P, P]
    keep = random_keep(6, 20, seed=5)
    counts = torch.tensor([20, 5, 12, 20, 5, 9])
    with torch.inference_mode():
        alone = torch.cat(
            [
                teacher.forward_patches(patches[i : i + 1, :c], keep[i : i + 1, :c])
                for i, c in enumerate(counts.tolist())
            ]
        )
        bucketed = run_bucketed(teacher.forward_patches, patches, keep, counts)
        padded = run_padded(teacher.forward_patches, patches, keep, counts)
    torch.testing.assert_close(bucketed, alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-5)


async def test_a_failing_batch_fails_its_requests_only_and_close_drains_the_queue() -> None:
    fwd = RecordingForward(fail_on=-1.0)
    b = make(fwd, max_delay_s=0.05)
    await b.start()
    bad, good = await asyncio.gather(
        b.submit(prepared(1, 4, fill=-1.0)), b.submit(prepared(1, 4)), return_exceptions=True
    )
    assert isinstance(bad, RuntimeError) and isinstance(good, RuntimeError)  # same micro-batch, same fate
    later = await b.submit(prepared(1, 4))
    assert later.logits.item() == 16.0  # the batcher survived
    queued = [asyncio.create_task(b.submit(prepared(1, 4))) for _ in range(3)]
    await asyncio.sleep(0)
    await b.close()
    assert all(t.done() and t.result().logits.item() == 16.0 for t in queued)
    with pytest.raises(ServiceUnavailableError):
        await b.submit(prepared(1, 4))
