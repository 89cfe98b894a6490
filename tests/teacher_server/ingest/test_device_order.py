"""The device's order across ingest workers (ingest/device_process.py, ingest/class_backlog.py): calls waiting at the
device run best class first and, within a class, by the smallest start tag on the shared fair clock; a call is held
back, for a while, for a worker that holds a better class, has formed a batch that goes first, or has queued a request
that goes first; with merging, a held call joins the call it waited for.

The device loop runs in a thread of this process on the other end of real socket pairs, as in test_ingest_rows.py."""

from __future__ import annotations

import functools
import multiprocessing
import os
import threading
import time

import pytest
import torch
from device_testkit import (
    CPU,
    held_device,
    queue_behind_a_held_forward,
    request,
    serving,
    teacher,  # noqa: F401 - a fixture the tests take
)

from maskedkd.masked_teacher import MaskedTeacher
from teacher_server.engine.batching.fair_clock import SharedFairClock
from teacher_server.engine.rows.answers import Answer
from teacher_server.engine.rows.rows_runner import JobShape, RowsRunner
from teacher_server.engine.rows.shared_host import shared_host_tensor
from teacher_server.engine.rows.staging import Stager
from teacher_server.ingest.class_backlog import ClassBacklog
from teacher_server.ingest.device_process import DeviceLoop
from teacher_server.ingest.remote_rows import RemoteRows
from teacher_server.metrics import ServerMetrics

pytestmark = [pytest.mark.dtype("float32"), pytest.mark.timeout(120)]


def test_the_device_runs_the_best_class_first_and_waits_for_a_better_class_on_its_way(teacher: MaskedTeacher) -> None:
    """Priority classes across workers (float32, CPU). Calls waiting at the device run best class first, not in
    arrival order; and a call is held back while a worker with no call there holds requests of a better class, until
    that worker's call comes."""
    backlog = ClassBacklog(multiprocessing.get_context("spawn"), 4)
    metrics = ServerMetrics()
    device, gate, started, forwards = held_device(teacher, metrics, backlog=backlog, hold_s=60.0)
    sizes = [1, 2, 3, 4]  # worker i's call has sizes[i] images: the order of the forwards tells whose ran
    ranks = [1, 2, 0, 0]  # standard, batch, interactive, interactive
    stagers = [Stager(teacher.geometry, max_images=4, device=CPU, allocate=shared_host_tensor) for _ in sizes]
    staged = [s.stage([request(n, 8, 40 + n)], s.acquire()) for s, n in zip(stagers, sizes, strict=True)]
    with serving(device, 4) as workers:

        def send(i: int, take: bool = True) -> None:  # a worker takes its request in, then sends it
            if take:
                backlog.writer(i).taken(ranks[i])
            RemoteRows(workers[i], os.getpid()).answers(staged[i], [JobShape(sizes[i], 8, rank=ranks[i])])

        # worker 0's call holds the forward; worker 1's (batch) and worker 2's (interactive) queue behind it
        senders = queue_behind_a_held_forward(device, started, [functools.partial(send, i) for i in range(3)])
        backlog.writer(3).taken(0)  # worker 3 takes in an interactive request; its call is not sent yet
        gate.set()
        senders[2].join(30)  # the interactive call ran next, before the batch call that came first
        time.sleep(0.3)
        assert forwards == [1, 3]  # worker 1's batch call is held for worker 3's
        last = threading.Thread(target=send, args=(3, False))  # worker 3's interactive call, taken in above
        last.start()
        for sender in [*senders, last]:
            sender.join(30)
    assert forwards == [1, 3, 4, 2]
    sample = metrics.registry.get_sample_value
    assert sample("maskedkd_device_holds_total", {"outcome": "ended"}) == 1  # worker 1's call, until worker 3's came
    assert sample("maskedkd_device_holds_total", {"outcome": "ran_out"}) is None
    assert 0.3 <= sample("maskedkd_device_hold_seconds_total") < 30


def test_with_merging_a_held_call_joins_the_better_call_it_waited_for(teacher: MaskedTeacher) -> None:
    """Holds and merging together, as on a GPU (merging asked for here on the CPU; float32): a batch call held back
    for an interactive call on its way runs in the same forward as that call once it comes, and each worker gets the
    answers the teacher gives its rows alone."""
    backlog = ClassBacklog(multiprocessing.get_context("spawn"), 3)
    metrics = ServerMetrics()
    device, gate, started, forwards = held_device(teacher, metrics, backlog=backlog, hold_s=60.0, merge=True)
    sizes, ranks = [1, 2, 2], [1, 2, 0]  # standard (holds the forward), batch, interactive
    stagers = [Stager(teacher.geometry, max_images=4, device=CPU, allocate=shared_host_tensor) for _ in sizes]
    staged = [
        s.stage([request(n, 8, 60 + i)], s.acquire()) for i, (s, n) in enumerate(zip(stagers, sizes, strict=True))
    ]
    jobs = [[JobShape(n, 8, rank=r)] for n, r in zip(sizes, ranks, strict=True)]
    answers: dict[int, list[Answer]] = {}
    with serving(device, 3) as workers:

        def send(i: int) -> None:
            answers[i] = RemoteRows(workers[i], os.getpid()).answers(staged[i], jobs[i])

        senders = queue_behind_a_held_forward(device, started, [functools.partial(send, i) for i in range(2)])
        backlog.writer(2).taken(0)  # worker 2 takes in an interactive request; its call is not sent yet
        gate.set()
        time.sleep(0.3)
        assert forwards == [1]  # worker 1's batch call is held for worker 2's
        senders.append(threading.Thread(target=send, args=(2,)))
        senders[-1].start()
        for sender in senders:
            sender.join(30)
    assert forwards == [1, 4]  # worker 2's rows and worker 1's in one forward
    assert metrics.registry.get_sample_value("maskedkd_device_holds_total", {"outcome": "ended"}) == 1
    for i in range(3):
        (alone,) = RowsRunner(teacher.forward_pixels).answers(staged[i], jobs[i])
        torch.testing.assert_close(answers[i][0].logits, alone.logits)  # CPU: batch composition only


@pytest.mark.parametrize("closed", [False, True])
def test_a_held_call_runs_after_the_hold_or_at_once_when_the_better_worker_is_gone(
    teacher: MaskedTeacher, closed: bool
) -> None:
    """A worker may hold a better class and not send it (stuck behind its own ledger): the teacher idles at most
    `hold_s` for it, and not at all for a worker whose socket has closed (float32, CPU)."""
    runner = RowsRunner(teacher.forward_pixels)
    backlog = ClassBacklog(multiprocessing.get_context("spawn"), 2)
    metrics = ServerMetrics()
    device = DeviceLoop(runner, CPU, metrics, backlog=backlog, hold_s=60.0 if closed else 0.5)
    stager = Stager(teacher.geometry, max_images=4, device=CPU, allocate=shared_host_tensor)
    rows = stager.stage([request(2, 8, 50)], stager.acquire())
    backlog.writer(1).taken(0)  # worker 1 holds an interactive request
    with serving(device, 2) as (mine, theirs):
        if closed:
            theirs.close()
            while device.connected() != {0}:
                time.sleep(0.01)
        begun = time.monotonic()
        (answer,) = RemoteRows(mine, os.getpid()).answers(rows, [JobShape(2, 8, rank=2)])
        waited = time.monotonic() - begun
    assert isinstance(answer, Answer)
    assert (waited < 5.0) if closed else (0.5 <= waited < 5.0), waited
    holds = metrics.registry.get_sample_value("maskedkd_device_holds_total", {"outcome": "ran_out"})
    assert holds == (None if closed else 1)  # the teacher's wait for worker 1, counted as having run out


def test_a_worker_a_hold_ran_out_for_is_waited_for_again_only_once_it_sends(teacher: MaskedTeacher) -> None:
    """Worker 1 holds an interactive request it does not send: the teacher waits `hold_s` for it once, then runs
    worker 0's calls at once; when worker 1's call has come and it holds better work again, the wait is back (float32,
    CPU)."""
    runner = RowsRunner(teacher.forward_pixels)
    backlog = ClassBacklog(multiprocessing.get_context("spawn"), 2)
    metrics = ServerMetrics()
    device = DeviceLoop(runner, CPU, metrics, backlog=backlog, hold_s=0.5)
    stager = Stager(teacher.geometry, max_images=4, device=CPU, allocate=shared_host_tensor)
    rows = stager.stage([request(2, 8, 51)], stager.acquire())
    waits: list[float] = []
    backlog.writer(1).taken(0)  # worker 1 holds an interactive request
    with serving(device, 2) as (mine, theirs):
        worker0, worker1 = RemoteRows(mine, os.getpid()), RemoteRows(theirs, os.getpid())

        def batch_call() -> None:
            begun = time.monotonic()
            (answer,) = worker0.answers(rows, [JobShape(2, 8, rank=2)])
            assert isinstance(answer, Answer)
            waits.append(time.monotonic() - begun)

        batch_call()  # held for worker 1 until the hold ran out
        batch_call()  # worker 1 still sends nothing: not waited for
        (answer,) = worker1.answers(rows, [JobShape(2, 8, rank=0)])  # its call comes: received, and run
        assert isinstance(answer, Answer)
        backlog.writer(1).taken(0)  # and it holds another one
        batch_call()  # waited for again
    assert 0.5 <= waits[0] < 5.0 and waits[1] < 0.4 and 0.5 <= waits[2] < 5.0, waits
    assert metrics.registry.get_sample_value("maskedkd_device_holds_total", {"outcome": "ran_out"}) == 2


def test_within_a_class_the_device_runs_the_smaller_start_tag_first_and_waits_for_a_formed_batch_before_it(
    teacher: MaskedTeacher,
) -> None:
    """Fair queuing across workers (float32, CPU): calls of one class run by their start tags on the workers' shared
    clock, not in arrival order; and a call is held back while a worker with no call here has formed a batch of a
    smaller tag, until that call comes, but not for a batch of a larger tag."""
    backlog = ClassBacklog(multiprocessing.get_context("spawn"), 4)
    device, gate, started, forwards = held_device(teacher, backlog=backlog, hold_s=60.0)
    sizes, tags = [1, 2, 3, 4], [0.0, 9.0, 5.0, 1.0]
    stagers = [Stager(teacher.geometry, max_images=4, device=CPU, allocate=shared_host_tensor) for _ in sizes]
    staged = [s.stage([request(n, 8, 60 + n)], s.acquire()) for s, n in zip(stagers, sizes, strict=True)]
    with serving(device, 4) as workers:

        def send(i: int) -> None:  # a worker forms a batch of one standard request, then sends it
            backlog.writer(i).taken(1)
            backlog.writer(i).formed(1, tags[i])
            RemoteRows(workers[i], os.getpid()).answers(staged[i], [JobShape(sizes[i], 8, tag=tags[i])])

        senders = queue_behind_a_held_forward(device, started, [functools.partial(send, i) for i in range(3)])
        backlog.writer(3).taken(1)
        backlog.writer(3).formed(1, 7.0)  # worker 3's batch (tag 7) goes before worker 1's (tag 9), not worker 2's
        gate.set()
        senders[2].join(30)
        time.sleep(0.3)
        assert forwards == [1, 3]  # worker 2's (tag 5) before worker 1's (tag 9), which now waits for worker 3's
        last = threading.Thread(
            target=RemoteRows(workers[3], os.getpid()).answers, args=(staged[3], [JobShape(4, 8, tag=7.0)])
        )
        last.start()
        for sender in [*senders, last]:
            sender.join(30)
    assert forwards == [1, 3, 4, 2]


@pytest.mark.parametrize(
    ("service_then", "service_now", "held"),
    [(5.0, 5.0, True), (12.0, 12.0, False), (5.0, 10.0, False)],
    ids=["head-goes-first", "head-goes-after", "head-served-elsewhere-since"],
)
def test_within_a_class_the_device_waits_for_a_worker_whose_queued_head_goes_first(
    teacher: MaskedTeacher, service_then: float, service_now: float, held: bool
) -> None:
    """A worker short of CPU forms its next batch late, after the device chose; so the device also waits for a worker
    whose queue would next take a request of a smaller start tag than the call it is about to run, reading that
    request's key's tag on the shared clock as it chooses, not as the worker wrote its head (float32, CPU). Worker 2
    has queued a request of a key whose service is `service_then` when its head is written and `service_now` (another
    worker served the key meanwhile) when the device chooses; worker 1's call has tag 9."""
    context = multiprocessing.get_context("spawn")
    clock = SharedFairClock(context)
    backlog = ClassBacklog(context, 3, clock)
    metrics = ServerMetrics()
    device, gate, started, forwards = held_device(teacher, metrics, backlog=backlog, hold_s=60.0)
    key = 7
    clock.queued(key, 1)
    clock.take(key, service_then, 1)  # the key's service so far
    clock.queued(key, 1)  # its next request, queued on worker 2, no batch formed
    backlog.writer(2).taken(1)
    backlog.writer(2).queue_head((1, key))
    sizes = [1, 2, 3]
    stagers = [Stager(teacher.geometry, max_images=4, device=CPU, allocate=shared_host_tensor) for _ in sizes]
    staged = [s.stage([request(n, 8, 80 + n)], s.acquire()) for s, n in zip(stagers, sizes, strict=True)]
    with serving(device, 3) as workers:

        def send(i: int, tag: float) -> None:  # a standard-class call of worker i with start tag `tag`
            RemoteRows(workers[i], os.getpid()).answers(staged[i], [JobShape(sizes[i], 8, tag=tag)])

        sends = [functools.partial(send, 0, 0.0), functools.partial(send, 1, 9.0)]
        senders = queue_behind_a_held_forward(device, started, sends)  # worker 0's forward runs, worker 1's waits
        if service_now > service_then:  # another worker took a request of the key since worker 2 wrote its head
            clock.take(key, service_now - service_then, 1)
            clock.queued(key, 1)
        gate.set()
        time.sleep(0.3)
        assert forwards == ([1] if held else [1, 2])  # worker 1's call held for worker 2's, or run at once
        backlog.writer(2).formed(1, service_now)  # worker 2 forms its batch (its queue is then empty) and sends it
        backlog.writer(2).queue_head(None)
        senders.append(threading.Thread(target=send, args=(2, service_now)))
        senders[-1].start()
        for sender in senders:
            sender.join(30)
    assert forwards == ([1, 3, 2] if held else [1, 2, 3])
    ended = metrics.registry.get_sample_value("maskedkd_device_holds_total", {"outcome": "ended"})
    assert ended == (1 if held else None)
