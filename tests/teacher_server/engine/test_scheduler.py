"""The micro-batcher's scheduler on its own (engine/batching/scheduler.py): fair shares across keys by weight, priority
classes, deadlines at batch formation, queue bounds, and the running compute estimate; fair shares across queues that
read one clock, in one process and in shared memory between processes (engine/batching/fair_clock.py). Pure Python: no
dtype, no device."""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass

import pytest

from teacher_server.engine.batching.fair_clock import Clock, FairClock, Load, SharedFairClock
from teacher_server.engine.batching.scheduler import ComputeEstimate, FairQueue, QueueLimits

pytestmark = pytest.mark.dtype("none")


@dataclass
class Job:
    key_id: int
    images: int = 1
    tokens: int = 10
    weight: float = 1.0
    priority: str = "standard"
    deadline: float | None = None
    enqueued_at: float = 0.0
    leads_batch: bool = False


def drain(queue: FairQueue[Job], *, per_batch: int = 1, now: float = 0.0) -> list[Job]:
    """Every job in the order the batches take them (batches of `per_batch` images)."""
    served: list[Job] = []
    while len(queue):
        batch, dropped = queue.next_batch(
            max_images=per_batch, token_budget=10**9, now=now, finish_s=lambda tokens: 0.0, live=lambda j: True
        )
        assert not dropped
        served += batch
    return served


def test_a_key_arriving_behind_another_keys_backlog_is_served_next() -> None:
    queue: FairQueue[Job] = FairQueue()
    for _ in range(50):
        queue.push(Job(key_id=1))
    queue.next_batch(max_images=1, token_budget=10**9, now=0.0, finish_s=lambda t: 0.0, live=lambda j: True)
    queue.push(Job(key_id=2))  # the light key's one request, after 49 of the greedy key's
    order = [j.key_id for j in drain(queue)]
    assert order.index(2) <= 1  # FIFO would serve it 50th


def test_backlogged_keys_share_the_teacher_by_weight_and_batches_mix_keys() -> None:
    queue: FairQueue[Job] = FairQueue()
    for _ in range(60):
        queue.push(Job(key_id=1, weight=3.0))
        queue.push(Job(key_id=2, weight=1.0))
    first_40 = [j.key_id for j in drain(queue)[:40]]
    assert first_40.count(1) == pytest.approx(30, abs=1) and first_40.count(2) == pytest.approx(10, abs=1)

    for _ in range(4):
        queue.push(Job(key_id=1))
        queue.push(Job(key_id=2))
    batch, _ = queue.next_batch(max_images=4, token_budget=10**9, now=0.0, finish_s=lambda t: 0.0, live=lambda j: True)
    assert sorted(j.key_id for j in batch) == [1, 1, 2, 2]  # one batch holds both keys' requests


@pytest.mark.parametrize("chunks", [True, False])
def test_a_chunk_of_a_split_request_joins_a_batch_only_as_its_first_request(chunks: bool) -> None:
    """A chunk (most of a batch by itself) is not taken behind another key's request, which would then wait for all
    of it; plain requests of the same sizes share the batch."""
    queue: FairQueue[Job] = FairQueue()
    for _ in range(3):
        queue.push(Job(key_id=1, tokens=80, leads_batch=chunks))  # key 1's request as three chunks
    first, _ = queue.next_batch(max_images=99, token_budget=100, now=0.0, finish_s=lambda t: 0.0, live=lambda j: True)
    queue.push(Job(key_id=2, tokens=10))  # a light key, while the first chunk runs: served next
    batches = [[(j.key_id, j.tokens) for j in first]]
    while len(queue):
        batch, _ = queue.next_batch(
            max_images=99, token_budget=100, now=0.0, finish_s=lambda t: 0.0, live=lambda j: True
        )
        batches.append([(j.key_id, j.tokens) for j in batch])
    if chunks:
        assert batches == [[(1, 80)], [(2, 10)], [(1, 80)], [(1, 80)]]
    else:
        assert batches == [[(1, 80)], [(2, 10), (1, 80)], [(1, 80)]]


def test_interactive_before_standard_before_batch_whatever_arrived_first() -> None:
    queue: FairQueue[Job] = FairQueue()
    for key_id, priority in [(1, "batch"), (2, "standard"), (3, "interactive"), (1, "batch"), (3, "interactive")]:
        queue.push(Job(key_id=key_id, priority=priority))
    assert [j.priority for j in drain(queue)] == ["interactive", "interactive", "standard", "batch", "batch"]


def test_a_request_that_cannot_finish_before_its_deadline_is_dropped_and_a_gone_caller_silently() -> None:
    queue: FairQueue[Job] = FairQueue()
    late, gone, on_time = Job(key_id=1, deadline=10.5), Job(key_id=1, deadline=None), Job(key_id=2, deadline=12.0)
    for job in (late, gone, on_time):
        queue.push(job)
    batch, dropped = queue.next_batch(
        max_images=8,
        token_budget=10**9,
        now=10.0,
        finish_s=lambda tokens: 0.1 * tokens,  # 10 tokens: 1 s, so 10.5 is missed and 12.0 is met
        live=lambda j: j is not gone,
    )
    assert batch == [on_time] and dropped == [late] and len(queue) == 0


def test_queue_bounds_per_key_and_in_all_refuse_with_a_reason_but_always_admit_a_keys_first_request() -> None:
    queue: FairQueue[Job] = FairQueue(QueueLimits(key_images=4, key_bytes=1000, total_images=6, total_bytes=0))
    assert queue.room_for(1, images=64) is None  # an idle key may always queue one request, however big
    queue.push(Job(key_id=1, images=3))
    assert queue.room_for(1, images=1) is None
    assert queue.room_for(1, images=2) == "this key has 3 images queued (at most 4)"
    assert queue.room_for(2, images=2) is None  # another key is not held back by the first one's queue
    queue.push(Job(key_id=2, images=2))
    assert queue.room_for(3, images=2) == "the server has 5 images queued (at most 6)"
    counted = queue.reserve_bytes(2, 900)  # being read: counts against the key's bytes before it is queued
    assert queue.room_for(2, nbytes=200) == "this key has 0 MiB queued (at most 0 MiB)"
    queue.release_bytes(2, 900, counted=counted)
    assert queue.room_for(2, nbytes=200) is None


def test_tokens_ahead_counts_higher_classes_and_earlier_fair_tags_only() -> None:
    queue: FairQueue[Job] = FairQueue()
    for _ in range(10):
        queue.push(Job(key_id=1, tokens=100))  # greedy standard key: 1,000 tokens queued
    queue.push(Job(key_id=3, tokens=50, priority="interactive"))
    # A new standard key's request of 10 tokens finishes (fair tags) after 1 greedy request and the interactive one.
    assert queue.tokens_ahead(2, "standard", 10, 1.0) == 100 + 50
    assert queue.tokens_ahead(2, "interactive", 10, 1.0) == 50
    assert queue.tokens_ahead(2, "batch", 10, 1.0) == 1050


@pytest.mark.parametrize("shared", [False, True], ids=["one-process-clock", "shared-memory-clock"])
def test_queues_on_one_clock_share_the_teacher_by_key_not_by_queue(shared: bool) -> None:
    """Two ingest workers' queues, taking turns at the teacher: key 1 reaches both, key 2 only the first."""

    def narrow_share(clocks: tuple[Clock, Clock]) -> float:
        first, second = FairQueue[Job](clock=clocks[0]), FairQueue[Job](clock=clocks[1])
        for _ in range(200):  # both keys backlogged on the first worker, key 1 alone on the second
            first.push(Job(key_id=1))
            first.push(Job(key_id=2))
            second.push(Job(key_id=1))
        taken: list[int] = []
        for _ in range(100):
            for queue in (first, second):
                batch, _ = queue.next_batch(
                    max_images=1, token_budget=10**9, now=0.0, finish_s=lambda t: 0.0, live=lambda j: True
                )
                taken += [j.key_id for j in batch]
        return taken.count(2) / len(taken)

    one = SharedFairClock(multiprocessing.get_context("spawn")) if shared else FairClock()
    assert narrow_share((one, one)) == pytest.approx(0.5, abs=0.02)
    assert narrow_share((FairClock(), FairClock())) == pytest.approx(0.25, abs=0.02)  # a clock each: per worker


def _serve_key_7(clock: SharedFairClock) -> None:
    clock.queued(7, images=4)
    clock.take(7, 100.0, images=4)


def test_the_shared_clock_is_one_clock_across_processes_and_a_key_without_service_frees_its_slot(
    caplog: pytest.LogCaptureFixture,
) -> None:
    context = multiprocessing.get_context("spawn")
    clock = SharedFairClock(context, slots=2)
    child = context.Process(target=_serve_key_7, args=(clock,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert clock.next_start(7) == 100.0  # the child's service of key 7, read here
    clock.queued(8, 1)
    clock.take(8, 40.0, 1)
    clock.queued(7, 1)
    clock.take(7, 10.0, 1)  # the virtual time moves to this request's start tag: 100
    assert clock.next_start(8) == 100.0  # key 8 left unused turns: it comes back at the virtual time
    clock.queued(9, 1)  # key 8 is as good as absent, so key 9 takes its slot
    assert clock.start_tag(9) == 100.0
    clock.queued(10, 1)  # both slots hold keys with work or service: key 10 is served as a newcomer each time
    assert clock.start_tag(10) == 100.0 and "more keys with work at once" in caplog.text
    assert clock.load(10).key_images == 0 and clock.load(10).images == 2  # and only the bounds in all count it
    clock.take(10, 5.0, 1)
    assert clock.next_start(10) == 100.0
    clock.drop(9, 20.0, 1)  # charged: key 9 starts at 120 while anything is queued
    assert clock.next_start(9) == 120.0
    clock.end_busy_period()  # nothing queued anywhere: everyone starts level with the latest finish tag
    assert clock.next_start(7) == clock.next_start(9) == clock.next_start(11) == 120.0


def test_a_key_queued_while_the_table_was_full_is_counted_right_once_it_has_a_slot() -> None:
    """Key 3's first request and bytes are counted in all only (both slots taken); its next ones get the slot key 1
    freed. What leaves later is taken off the count it was added to: key 3's own counts stay exact."""
    clock = SharedFairClock(multiprocessing.get_context("spawn"), slots=2)
    clock.queued(1, 1)
    clock.queued(2, 1)
    clock.queued(3, 5)  # the table is full: counted in all only
    first_bytes = clock.reserve(3, 500)
    clock.take(1, 10.0, 1)
    clock.take(2, 10.0, 1)
    clock.queued(2, 1)
    clock.take(2, 10.0, 1)  # the virtual time reaches key 1's service: its slot is free
    clock.queued(3, 7)  # key 3 takes it
    second_bytes = clock.reserve(3, 300)
    assert (first_bytes, second_bytes) == (False, True)
    assert clock.load(3) == Load(key_images=7, key_bytes=300, images=12, nbytes=800)
    clock.release(3, 500, counted=first_bytes)
    clock.take(3, 5.0, 5)  # the request queued without a slot leaves first
    assert clock.load(3) == Load(key_images=7, key_bytes=300, images=7, nbytes=300)
    clock.release(3, 300, counted=second_bytes)
    clock.take(3, 7.0, 7)
    assert clock.load(3) == Load(key_images=0, key_bytes=0, images=0, nbytes=0)


def test_queue_bounds_hold_for_the_queues_on_one_shared_clock_together() -> None:
    """Two ingest workers' queues: a key's images and bytes, and the server's, count on both."""
    clock = SharedFairClock(multiprocessing.get_context("spawn"))
    limits = QueueLimits(key_images=4, key_bytes=1000, total_images=6, total_bytes=0)
    first, second = FairQueue[Job](limits, clock), FairQueue[Job](limits, clock)
    first.push(Job(key_id=1, images=3))
    assert second.room_for(1, images=2) == "this key has 3 images queued (at most 4)"
    assert second.room_for(2, images=2) is None
    second.push(Job(key_id=2, images=2))
    assert first.room_for(3, images=2) == "the server has 5 images queued (at most 6)"
    counted = first.reserve_bytes(2, 900)  # key 2's next request, being read by the first worker
    assert second.room_for(2, nbytes=200) == "this key has 0 MiB queued (at most 0 MiB)"
    first.release_bytes(2, 900, counted=counted)
    assert second.room_for(2, nbytes=200) is None
    drain(first)  # key 1's images leave the queue: room again on the other worker
    assert second.room_for(1, images=4) is None


def test_compute_estimate_fits_a_fixed_cost_and_a_per_token_cost_and_ignores_set_up() -> None:
    estimate = ComputeEstimate()
    estimate.observe(100, 30.0)  # the first batch: one-time set-up, not counted
    assert estimate.seconds(1000) == 0.0
    for tokens in [100, 400, 1600, 100, 800, 1600] * 3:
        estimate.observe(tokens, 0.002 + 1e-5 * tokens)  # 2 ms launch + 10 us per token
    assert estimate.seconds(100) == pytest.approx(0.003, rel=1e-6)
    assert estimate.seconds(10_000) == pytest.approx(0.102, rel=1e-6)
    estimate.observe(100, 5.0)  # a stall: moves the estimate by at most 4x, not 1,600x
    assert estimate.seconds(100) < 4 * 0.003 * 1.01


def test_compute_estimate_a_slow_larger_batch_among_small_ones_does_not_steepen_the_rate() -> None:
    """A free fit through (264 tokens, 43 ms) x 20 and (528, 100 ms) has a negative fixed cost; the fit with fixed >= 0
    is the one through the origin (sum t*s / sum t*t), which still admits two requests into a 100 ms batch."""
    estimate = ComputeEstimate()
    estimate.observe(264, 1.0)  # set-up, not counted
    points = [(264, 0.043)] * 20 + [(528, 0.100)]
    for tokens, seconds in points:
        estimate.observe(tokens, seconds)
    weights = [estimate.decay ** (len(points) - 1 - i) for i in range(len(points))]
    through_origin = sum(w * t * s for w, (t, s) in zip(weights, points, strict=True)) / sum(
        w * t * t for w, (t, _) in zip(weights, points, strict=True)
    )
    assert estimate.seconds(0) == 0.0
    assert estimate.seconds(1000) == pytest.approx(1000 * through_origin, rel=1e-9)
    assert estimate.tokens_within(0.100) >= 2 * 264
