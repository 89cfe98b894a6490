"""A batch of other keys run between two blocks of a long CPU forward (engine/batching/preemption.py), on a real tiny
ViT teacher in float32 on the CPU: who may preempt, that each batch's logits are those of its own rows alone, that an
offer no block boundary takes runs after the forward, and the same through a served teacher, read back from the ledger
with SQL."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import service_testkit as kit
import timm
import torch
from service_testkit import MODEL, TINY, random_keep
from torch import nn

from maskedkd.masked_teacher import MaskedTeacher
from teacher_server.engine.batching.batch_job import JobResult
from teacher_server.engine.batching.batcher import TokenBudgetBatcher
from teacher_server.engine.batching.forward_step import COMMIT_S_MARGIN
from teacher_server.engine.batching.preemption import MIN_SHARED_SHARE, ForwardSpan, Offer, YieldPoints
from teacher_server.engine.rows.decode import DecodedInput
from teacher_server.engine.rows.rows_runner import RowsRunner
from teacher_server.engine.rows.staging import Stager
from teacher_server.engine.served_model import make_forward
from teacher_server.metrics import ServerMetrics
from teacher_server.testing.server import running_server

pytestmark = [pytest.mark.dtype("float32"), pytest.mark.timeout(120)]

CPU = torch.device("cpu")
K = 32  # kept patches of the 8x8 grid: keep 50%
BIG, SMALL = 48, 2  # images of the long batch and of the request that may run between its blocks
ROW_BLOCK_S = 0.0005  # each block sleeps this long per row: the forward's length follows its rows, as compute does


class SlowBlocks:
    """Forward pre-hooks that make each block of the teacher take ROW_BLOCK_S per row (the tiny ViT alone is too
    fast for a forward to be caught running), recording which batch size ran each block, in order."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        self.rows: list[int] = []
        for block in blocks:
            block.register_forward_pre_hook(self._slow)

    def _slow(self, _module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.rows.append(int(args[0].shape[0]))
        time.sleep(ROW_BLOCK_S * args[0].shape[0])


def teacher() -> MaskedTeacher:
    torch.manual_seed(0)
    return MaskedTeacher(timm.create_model(MODEL, pretrained=False, **TINY).eval())


def request(images: int, seed: int) -> DecodedInput:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (images, K, 3, 4, 4), dtype=torch.uint8, generator=g)  # [B, K, C, P, P]
    return DecodedInput("patches", pixels, random_keep(images, K, seed), torch.full((images,), K), b"")


def batcher(model: MaskedTeacher, yields: YieldPoints | None) -> TokenBudgetBatcher:
    runner = RowsRunner(make_forward(model, CPU, torch.float32))
    return TokenBudgetBatcher(
        runner,
        metrics=ServerMetrics(),
        stager=Stager(model.geometry, max_images=64, device=CPU, in_place=True),
        num_prefix_tokens=1,
        token_budget=65536,
        max_batch_images=64,
        max_delay_s=0.0,
        max_batch_s=10.0,  # no batch is cut: the long one runs whole
        yield_points=yields,
    )


async def learn_the_forward(b: TokenBudgetBatcher) -> None:
    """Batches of both sizes alone, so the compute estimate knows a small batch is much shorter than a big one."""
    for images in (SMALL, BIG, SMALL, BIG, SMALL):
        await b.submit(request(images, seed=100 + images), key_id=1)


def preempting_batches(b: TokenBudgetBatcher) -> float:
    """`maskedkd_preempting_batches_total` as the server's /metrics would read it."""
    assert b._metrics is not None
    value = b._metrics.registry.get_sample_value("maskedkd_preempting_batches_total", {"model": "teacher"})
    return value or 0.0


def alone(model: MaskedTeacher, images: int, seed: int) -> torch.Tensor:
    """The reference: the request's rows as their own batch, through the teacher's own masked forward."""
    r = request(images, seed)
    with torch.inference_mode():
        return model.forward_pixels(r.pixels, r.keep_indices).float()


@dataclass
class Scenario:
    """What one run of `big_then_small` saw: (name, result, when answered) in answer order, the batch size of each
    block run in order, and the batches counted as run inside another's forward."""

    done: list[tuple[str, JobResult, float]]
    block_rows: list[int]
    preempting: float
    model: MaskedTeacher


async def big_then_small(
    *, small_key: int, small_priority: str, yields: bool = True, also: tuple[int, str] | None = None
) -> Scenario:
    """After the batcher learned both batch sizes, key 1 sends BIG images at `interactive`; a quarter into their
    forward, `small_key` sends SMALL at `small_priority`, and with it, where `also` is (key, priority), another SMALL
    request named "also". `yields`: the teacher has yield points."""
    model = teacher()
    slow = SlowBlocks(list(model.model.blocks))
    b = batcher(model, YieldPoints(list(model.model.blocks)) if yields else None)
    await b.start()
    await learn_the_forward(b)
    slow.rows.clear()
    done: list[tuple[str, JobResult, float]] = []

    async def send(name: str, images: int, key: int, priority: str, seed: int) -> None:
        result = await b.submit(request(images, seed), key_id=key, priority=priority)
        done.append((name, result, time.monotonic()))

    big = asyncio.ensure_future(send("big", BIG, 1, "interactive", seed=1))
    await asyncio.sleep(12 * ROW_BLOCK_S * BIG * 0.25)
    smalls = [send("small", SMALL, small_key, small_priority, seed=2)]
    if also is not None:
        smalls.append(send("also", SMALL, *also, seed=3))
    await asyncio.gather(*smalls)
    await big
    await b.close()
    return Scenario(done, slow.rows, preempting_batches(b), model)


async def test_another_keys_small_batch_runs_between_the_blocks_of_a_long_forward() -> None:
    seen = await big_then_small(small_key=2, small_priority="interactive")
    assert [name for name, _, _ in seen.done] == ["small", "big"]  # answered during the big forward, not after it
    # the small batch's 12 blocks ran whole between two of the big forward's: some of its blocks before, some after
    first_small = seen.block_rows.index(SMALL)
    assert seen.block_rows[first_small : first_small + 12] == [SMALL] * 12
    assert 0 < first_small < 12 and seen.block_rows.count(BIG) == 12
    assert seen.preempting == 1
    (_, small, _), (_, big, big_answered) = seen.done
    assert small.stats.images == SMALL and big.stats.images == BIG  # each its own batch
    torch.testing.assert_close(small.logits, alone(seen.model, SMALL, seed=2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(big.logits, alone(seen.model, BIG, seed=1), rtol=1e-5, atol=1e-5)
    # the big batch's compute (what the estimate learns) leaves out the small batch's forward inside it
    assert big.stats.compute_s <= big_answered - big.stats.started_at - small.stats.compute_s


async def test_a_batch_run_between_the_blocks_leaves_out_requests_of_a_worse_class_than_the_running_one() -> None:
    """Key 2's interactive request and key 3's batch-class request arrive together while key 1's interactive batch
    runs: fair queuing would put both in the next batch, but only key 2's runs inside the interactive forward."""
    seen = await big_then_small(small_key=2, small_priority="interactive", also=(3, "batch"))
    assert [name for name, _, _ in seen.done] == ["small", "big", "also"]
    first_small = seen.block_rows.index(SMALL)
    assert 0 < first_small < 12 and seen.block_rows[first_small : first_small + 12] == [SMALL] * 12
    assert seen.block_rows[-12:] == [SMALL] * 12 and seen.block_rows.count(BIG) == 12
    assert seen.preempting == 1
    (_, small, _), _, (_, also, _) = seen.done
    torch.testing.assert_close(small.logits, alone(seen.model, SMALL, seed=2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(also.logits, alone(seen.model, SMALL, seed=3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("small_key", "small_priority", "yields"),
    [(1, "interactive", True), (2, "batch", True), (2, "interactive", False)],
    ids=["the-running-key", "a-worse-class", "no-yield-points"],
)
async def test_the_running_key_a_worse_class_or_a_teacher_without_yield_points_waits_for_the_running_batch(
    small_key: int, small_priority: str, yields: bool
) -> None:
    """Without yield points: a GPU, compiled or ingest-worker teacher; the order fair queuing gives, batch after
    batch."""
    seen = await big_then_small(small_key=small_key, small_priority=small_priority, yields=yields)
    assert [name for name, _, _ in seen.done] == ["big", "small"]
    assert seen.block_rows == [BIG] * 12 + [SMALL] * 12
    assert seen.preempting == 0


async def test_admission_leaves_room_for_offers_once_another_key_sends_even_before_any_ran() -> None:
    """A key alone is estimated at its own forwards' time (no offer ever runs inside them). A request of a key that
    starts to send beside it, or of the first key once the other sends, is estimated as if offers took at least
    MIN_SHARED_SHARE of the forwards, although none ran yet (the learned share is still 0): admitted to the edge of
    its deadline, a flood's first batches would otherwise leave no room for another key's batch inside them."""
    model = teacher()
    yields = YieldPoints(list(model.model.blocks))
    b = batcher(model, yields)
    await b.start()
    await learn_the_forward(b)  # key 1 alone
    assert yields.share == 0.0
    tokens = SMALL * (K + 1)

    def own(key: int) -> float:  # the estimate less the commit's margin: the forwards' part
        return b.expected_wait_s(key, "standard", tokens, 1.0) - COMMIT_S_MARGIN

    alone_s = own(1)
    assert alone_s == pytest.approx(b.compute.seconds(tokens))  # nothing queued or running, no slowdown
    assert own(2) == pytest.approx(alone_s / (1 - MIN_SHARED_SHARE))  # key 2 would share the teacher with key 1
    await b.submit(request(SMALL, seed=5), key_id=2)
    assert own(1) == pytest.approx(b.compute.seconds(tokens) / (1 - MIN_SHARED_SHARE))  # key 1 now shares it too
    # a teacher without yield points runs no offers: its estimate has no slowdown however many keys send
    plain = batcher(model, None)
    await plain.start()
    await learn_the_forward(plain)
    await plain.submit(request(SMALL, seed=5), key_id=2)
    assert plain.expected_wait_s(1, "standard", tokens, 1.0) - COMMIT_S_MARGIN == pytest.approx(
        plain.compute.seconds(tokens)
    )


def test_through_the_server_a_light_keys_call_is_answered_inside_a_flood_keys_forward_and_each_billed_once(
    tmp_path: Path,
) -> None:
    """The served teacher (eager, CPU, float32) has yield points: a light key's call sent while another key's long
    call runs is answered first, from its own batch, and the ledger bills each once, at its own batch's size; the
    metric counts the batch run inside the other's forward."""
    model = kit.tiny_vit(seed=3)
    slow = SlowBlocks(list(model.blocks))
    settings = kit.settings(tmp_path, dtype="float32", max_batch_ms=10_000.0)  # the flood's call runs as one batch
    with running_server(settings, model=model) as srv:
        assert srv.server.served.batcher._yields is not None
        flood, light = srv.create_key("flood"), srv.create_key("light")
        _, teacher = kit.stub(srv.address)

        def call(key: str, images: int, request_id: str) -> Any:
            request = kit.image_request(kit.random_images(images, seed=images), kit.random_keep(images, K, seed=1))
            request.request_id = request_id
            return teacher.Infer.future(request, metadata=kit.auth(key), timeout=60)

        for i, images in enumerate((SMALL, BIG, SMALL, BIG, SMALL)):  # the compute estimate learns both sizes
            call(flood, images, f"learn-{i}").result()
        slow.rows.clear()
        answered: list[str] = []
        big = call(flood, BIG, "big")
        big.add_done_callback(lambda _: answered.append("big"))
        time.sleep(12 * ROW_BLOCK_S * BIG * 0.25)
        small = call(light, SMALL, "small")
        small.add_done_callback(lambda _: answered.append("small"))
        small_answer, big_answer = small.result(), big.result()
        wait_until(lambda: len(answered) == 2)
        assert answered == ["small", "big"]
        reference = kit.Reference(model)
        for answer, images in ((small_answer, SMALL), (big_answer, BIG)):
            expected = reference.logits(kit.random_images(images, seed=images), kit.random_keep(images, K, seed=1))
            torch.testing.assert_close(kit.logits_of(answer), expected, **kit.CLOSE)
        metric = srv.server.metrics.registry.get_sample_value(
            "maskedkd_preempting_batches_total", {"model": srv.server.served.name}
        )
        assert metric == 1
    rows = sqlite3.connect(settings.db.removeprefix("sqlite:///")).execute(
        "SELECT k.name, u.request_id, u.images, u.batch_images FROM usage u JOIN api_keys k ON k.id = u.api_key_id "
        "WHERE u.request_id IN ('big', 'small') ORDER BY u.request_id"
    )
    assert rows.fetchall() == [("flood", "big", BIG, BIG), ("light", "small", SMALL, SMALL)]


def wait_until(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.01)


@pytest.mark.dtype("none")
def test_an_offer_runs_once_at_a_block_boundary_where_it_fits_else_after_the_forward() -> None:
    blocks = [nn.Identity() for _ in range(4)]
    yields = YieldPoints(blocks)
    ran: list[tuple[str, bool]] = []

    def forward(tag: str) -> None:
        for block in blocks:
            ran.append((tag, False))
            block(torch.zeros(1))

    def answer(nested: bool) -> str:
        ran.append(("offer", nested))
        return "answer"

    fits = [False, False, True]  # not at the first two boundaries: the running batch's callers could not wait
    offer: Offer[str] = Offer(answer, lambda: fits.pop(0))
    yields.offer(offer)
    span = ForwardSpan()
    with yields.preemptible(span):
        forward("running")
    offer.run_unless_taken()  # the forward thread's queue after the forward: already taken, not run again
    assert ran.count(("offer", True)) == 1 and ("offer", False) not in ran
    assert [tag for tag, _ in ran].index("offer") == 3  # after three of the running forward's blocks
    assert offer.result.result() == "answer" and not yields.waiting and span.inside_s > 0
    # admission then allows for offers running inside forwards: a request's wait is estimated that much longer
    assert 0 < yields.share <= 1 and yields.slowdown(shared=False) == pytest.approx(1 / (1 - min(yields.share, 0.5)))
    floor = max(yields.share, MIN_SHARED_SHARE)  # while other keys send: at least that much room for offers
    assert yields.slowdown(shared=True) == pytest.approx(1 / (1 - min(floor, 0.5)))
    share = yields.share

    late: Offer[str] = Offer(lambda nested: "after" if not nested else "inside", lambda: False)
    yields.offer(late)
    with yields.preemptible(ForwardSpan()):
        forward("running")
    assert yields.waiting
    late.run_unless_taken()
    assert late.result.result() == "after"
    assert yields.share < share  # a forward no offer ran in lowers it

    other_thread: Offer[str] = Offer(lambda nested: "inside", lambda: True)
    yields.offer(other_thread)
    with yields.preemptible(ForwardSpan()):
        worker = threading.Thread(target=forward, args=("elsewhere",))  # a start-up check on another thread
        worker.start()
        worker.join()
    forward("outside")  # the forward thread, but outside `preemptible`
    assert yields.waiting
