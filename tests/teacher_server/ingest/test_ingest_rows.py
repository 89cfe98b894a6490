"""A worker's batch run by the device loop (ingest/): the same answers as the teacher run here, rows read from the
worker's shared memory, also when the rows were cut down to a copy and when extra outputs are asked for; requests
whose callers gave up while the batch waited at the device are not run and not billed.

The device loop runs in a thread of this process on the other end of a real socket pair (descriptors are passed as
between processes); the process boundary itself is tested in test_ingest_workers.py."""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection

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
from maskedkd.teacher_outputs import OutputChoice
from teacher_server.engine.batching.batcher import TokenBudgetBatcher
from teacher_server.engine.rows.answers import NO_OUTPUTS, Answer, OutputsRequest
from teacher_server.engine.rows.rows_runner import JobShape, Late, MixedK, RowsRunner
from teacher_server.engine.rows.shared_host import region_of, shared_host_tensor
from teacher_server.engine.rows.staging import Stager
from teacher_server.engine.served_model import make_outputs_forward
from teacher_server.errors import DeadlineUnmetError, ServiceUnavailableError
from teacher_server.ingest.class_backlog import ClassBacklog
from teacher_server.ingest.device_process import DeviceLoop
from teacher_server.ingest.remote_rows import DeviceForwardError, RemoteRows
from teacher_server.metrics import ServerMetrics

pytestmark = [pytest.mark.dtype("float32"), pytest.mark.timeout(120)]


@pytest.fixture
def remote(teacher: MaskedTeacher) -> Iterator[RemoteRows]:
    runner = RowsRunner(teacher.forward_pixels, forward_outputs=make_outputs_forward(teacher))
    with serving(DeviceLoop(runner, CPU, ServerMetrics())) as (here,):
        yield RemoteRows(here, os.getpid())


def test_shared_staging_runs_remotely_as_here(teacher: MaskedTeacher, remote: RemoteRows) -> None:
    stager = Stager(teacher.geometry, max_images=16, device=CPU, allocate=shared_host_tensor)
    inputs = [request(2, 12, 1), request(3, 12, 2, counts=[12, 7, 3]), request(1, 5, 3)]
    rows = stager.stage(inputs, stager.acquire())
    assert region_of(rows.pixels) is not None and region_of(rows.indices) is not None  # staged in shared memory
    jobs = [JobShape(x.images, x.k) for x in inputs]
    local = RowsRunner(teacher.forward_pixels).answers(rows, jobs)
    got = remote.answers(rows, jobs)
    assert [a.logits.shape for a in got] == [(2, 10), (3, 10), (1, 10)]
    for mine, theirs in zip(got, local, strict=True):
        assert torch.equal(mine.logits, theirs.logits)  # the same forward on the same bytes
    again = remote.answers(rows, jobs)  # regions are handed over once; the second call reuses them
    assert all(torch.equal(a.logits, b.logits) for a, b in zip(again, got, strict=True))

    cut = rows.select([0, 1, 5])  # callers that left: a copy outside shared memory, spilled into it to cross
    assert region_of(cut.pixels) is None
    cut_jobs = [JobShape(2, 12), JobShape(1, 5)]
    here = RowsRunner(teacher.forward_pixels).answers(cut, cut_jobs)
    for mine, theirs in zip(remote.answers(cut, cut_jobs), here, strict=True):
        assert torch.equal(mine.logits, theirs.logits)


def test_extra_outputs_cross_encoded(teacher: MaskedTeacher, remote: RemoteRows) -> None:
    stager = Stager(teacher.geometry, max_images=16, device=CPU, allocate=shared_host_tensor)
    inputs = [request(2, 10, 4), request(2, 6, 5)]
    rows = stager.stage(inputs, stager.acquire())
    asked = OutputsRequest(OutputChoice(pre_logits=True, patch_tokens=True, attention="mean"))
    jobs = [JobShape(2, 10, asked), JobShape(2, 6)]
    local = RowsRunner(teacher.forward_pixels, forward_outputs=make_outputs_forward(teacher)).answers(rows, jobs)
    got = remote.answers(rows, jobs)
    assert got[1].outputs is None and got[0].outputs is not None and local[0].outputs is not None
    assert got[0].outputs.SerializeToString() == local[0].outputs.SerializeToString()
    assert all(torch.equal(a.logits, b.logits) for a, b in zip(got, local, strict=True))


def test_a_failed_forward_is_an_error_for_the_batch(teacher: MaskedTeacher) -> None:

    def broken(pixels: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
        raise RuntimeError("out of device memory\nsecond line")

    stager = Stager(teacher.geometry, max_images=4, device=CPU, allocate=shared_host_tensor)
    x = request(1, 4, 6)
    with (
        serving(DeviceLoop(RowsRunner(broken), CPU, ServerMetrics())) as (here,),
        pytest.raises(DeviceForwardError, match=r"^the teacher's forward failed: out of device memory$"),
    ):
        RemoteRows(here, os.getpid()).answers(stager.stage([x], stager.acquire()), [JobShape(1, 4)])


def test_a_gone_device_process_is_unavailable(teacher: MaskedTeacher) -> None:
    """A call that cannot be sent is refused UNAVAILABLE, and its request is let go in the worker's counts per class
    (the device, which counts what it receives, never will) (float32, CPU)."""
    here, there = multiprocessing.Pipe(duplex=True)
    there.close()  # the device process died
    backlog = ClassBacklog(multiprocessing.get_context("spawn"), 1)
    backlog.writer(0).taken(0)
    stager = Stager(teacher.geometry, max_images=4, device=CPU, allocate=shared_host_tensor)
    rows = stager.stage([request(1, 4, 7)], stager.acquire())
    with pytest.raises(ServiceUnavailableError, match="device process is gone; nothing was billed"):
        RemoteRows(here, os.getpid(), backlog.writer(0)).answers(rows, [JobShape(1, 4, rank=0)])
    assert backlog.kept(0) == (0, 0, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.dtype("float32", device="cuda")
def test_a_cuda_device_loop_reads_the_shared_rows(teacher: MaskedTeacher) -> None:
    """The device loop on CUDA (shared regions registered as pinned, one copy to the device) answers what the host
    teacher answers on the same staged rows."""
    import copy

    from teacher_server.engine.served_model import make_forward

    on_cuda = copy.deepcopy(teacher).to("cuda")
    runner = RowsRunner(make_forward(on_cuda, torch.device("cuda"), torch.float32))
    stager = Stager(teacher.geometry, max_images=16, device=CPU, allocate=shared_host_tensor)
    inputs = [request(3, 32, 8), request(2, 16, 9, counts=[16, 9])]
    rows = stager.stage(inputs, stager.acquire())
    jobs = [JobShape(x.images, x.k) for x in inputs]
    with serving(DeviceLoop(runner, torch.device("cuda"), ServerMetrics())) as (here,):
        got = RemoteRows(here, os.getpid()).answers(rows, jobs)
    for mine, theirs in zip(got, RowsRunner(teacher.forward_pixels).answers(rows, jobs), strict=True):
        torch.testing.assert_close(mine.logits, theirs.logits, atol=1e-4, rtol=1e-4)


CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize(
    ("device_type", "mixed_k"),
    [
        ("cpu", "pad"),
        ("cpu", "bucket"),
        pytest.param("cuda", "bucket", marks=[CUDA_ONLY, pytest.mark.dtype("float32", device="cuda")], id="cuda"),
    ],
)
def test_calls_queued_during_a_forward_share_the_next_one_up_to_the_batch_bounds(
    teacher: MaskedTeacher, device_type: str, mixed_k: MixedK
) -> None:
    """With merging (on by default on a GPU; asked for here on the CPU), the logits-only calls of several workers that
    queue up while a forward runs go into the next forward together, up to `max_images`; a call asking for extra
    outputs runs alone. Each worker gets the answers the teacher gives its rows alone (float32; on CUDA against the
    host teacher)."""
    import copy

    from teacher_server.engine.served_model import make_forward

    gate, started = threading.Event(), threading.Event()
    forwards: list[int] = []  # rows of each logits forward, in order
    device_of = torch.device(device_type)
    served = copy.deepcopy(teacher).to(device_of)
    forward = teacher.forward_pixels if device_type == "cpu" else make_forward(served, device_of, torch.float32)

    def gated(pixels: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
        forwards.append(int(pixels.shape[0]))
        started.set()
        gate.wait(30)
        return forward(pixels, indices, counts)

    runner = RowsRunner(gated, mixed_k=mixed_k, forward_outputs=make_outputs_forward(served))
    metrics = ServerMetrics()
    device = DeviceLoop(runner, device_of, metrics, merge=True if device_type == "cpu" else None, max_images=4)
    asked = OutputsRequest(OutputChoice(pre_logits=True))
    calls = [  # (inputs, outputs asked): A runs first and holds the forward while the others queue
        ([request(2, 12, 11)], NO_OUTPUTS),
        ([request(2, 8, 12, counts=[8, 3])], asked),
        ([request(2, 12, 13, counts=[12, 5])], NO_OUTPUTS),
        ([request(1, 5, 14), request(1, 12, 15)], NO_OUTPUTS),
        ([request(2, 6, 16)], NO_OUTPUTS),
    ]
    stagers = [Stager(teacher.geometry, max_images=4, device=CPU, allocate=shared_host_tensor) for _ in calls]
    staged = [s.stage(inputs, s.acquire()) for s, (inputs, _) in zip(stagers, calls, strict=True)]  # a worker each
    jobs = [[JobShape(x.images, x.k, outputs) for x in inputs] for inputs, outputs in calls]
    answers: dict[int, list[Answer]] = {}
    with serving(device, len(calls)) as workers:

        def send(i: int) -> None:
            answers[i] = RemoteRows(workers[i], os.getpid()).answers(staged[i], jobs[i])

        senders = queue_behind_a_held_forward(device, started, [functools.partial(send, i) for i in range(len(calls))])
        gate.set()
        for sender in senders:
            sender.join(30)
    # A alone; B (outputs) alone; C (2) + D (2) fill max_images 4; E (2) next
    assert metrics.registry.get_sample_value("maskedkd_batch_images_count") == 4
    assert metrics.registry.get_sample_value("maskedkd_batch_images_sum") == 10
    if mixed_k == "pad":  # one logits forward a batch (bucket: one per keep count)
        assert forwards == [2, 4, 2]
    for i, (rows, shape) in enumerate(zip(staged, jobs, strict=True)):
        alone = RowsRunner(teacher.forward_pixels, forward_outputs=make_outputs_forward(teacher)).answers(rows, shape)
        for mine, theirs in zip(answers[i], alone, strict=True):
            tolerance = {} if device_type == "cpu" else {"atol": 1e-4, "rtol": 1e-4}  # CPU: batch composition only
            torch.testing.assert_close(mine.logits, theirs.logits, **tolerance)
            assert (mine.outputs is None) == (theirs.outputs is None)


def test_a_failed_joined_forward_fails_each_of_its_calls_and_the_loop_goes_on(teacher: MaskedTeacher) -> None:
    """A joined forward that raises answers each of its calls with the reason (their workers bill nothing); the
    forward thread lives on and runs the next call (float32, CPU)."""
    gate = threading.Event()
    started = threading.Event()

    def fails_when_joined(pixels: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
        started.set()
        gate.wait(30)
        if pixels.shape[0] > 2:
            raise RuntimeError("out of device memory")
        return teacher.forward_pixels(pixels, indices, counts)

    device = DeviceLoop(RowsRunner(fails_when_joined), CPU, ServerMetrics(), merge=True)
    stagers = [Stager(teacher.geometry, max_images=4, device=CPU, allocate=shared_host_tensor) for _ in range(3)]
    staged = [s.stage([request(2, 8, 20 + i)], s.acquire()) for i, s in enumerate(stagers)]
    outcome: dict[int, object] = {}
    with serving(device, 3) as workers:

        def send(i: int) -> None:
            try:
                outcome[i] = RemoteRows(workers[i], os.getpid()).answers(staged[i], [JobShape(2, 8)])
            except DeviceForwardError as exc:
                outcome[i] = exc

        senders = queue_behind_a_held_forward(device, started, [functools.partial(send, i) for i in range(3)])
        gate.set()
        for sender in senders:
            sender.join(30)
        assert isinstance(outcome[0], list)  # ran alone, before the others queued
        for i in (1, 2):
            assert isinstance(outcome[i], DeviceForwardError)
            assert str(outcome[i]) == "the teacher's forward failed: out of device memory"
        again = RemoteRows(workers[1], os.getpid()).answers(staged[1], [JobShape(2, 8)])  # the loop still runs
    expected = RowsRunner(teacher.forward_pixels).answers(staged[1], [JobShape(2, 8)])
    assert torch.equal(again[0].logits, expected[0].logits)


def test_requests_whose_callers_gave_up_while_queued_at_the_device_are_cut_out(teacher: MaskedTeacher) -> None:
    """A worker checks its requests' deadlines as it sends a batch; the device checks again as the forward starts,
    after waiting behind another worker's: a request whose caller has given up by then is not run, and a batch with
    none left runs no forward (float32, CPU; the rest answered as the teacher answers those rows alone)."""
    device, gate, started, forwards = held_device(teacher)
    soon = time.monotonic() + 0.2
    inputs = [[request(2, 8, 30)], [request(1, 8, 31), request(2, 8, 32)], [request(1, 8, 33)]]
    calls = [  # A holds the forward; B's first request and C's only one are late by the time they could run
        [JobShape(2, 8)],
        [JobShape(1, 8, deadline=soon), JobShape(2, 8, deadline=soon + 60)],
        [JobShape(1, 8, deadline=soon)],
    ]
    stagers = [Stager(teacher.geometry, max_images=4, device=CPU, allocate=shared_host_tensor) for _ in calls]
    staged = [s.stage(x, s.acquire()) for s, x in zip(stagers, inputs, strict=True)]
    answers: dict[int, list[Answer | Late]] = {}
    with serving(device, len(calls)) as workers:

        def send(i: int) -> None:
            answers[i] = RemoteRows(workers[i], os.getpid()).answers(staged[i], calls[i])

        senders = queue_behind_a_held_forward(device, started, [functools.partial(send, i) for i in range(3)])
        while time.monotonic() < soon:
            time.sleep(0.01)
        gate.set()
        for sender in senders:
            sender.join(30)
    assert forwards == [2, 2]  # A; then B's second request alone; C none
    assert isinstance(answers[2][0], Late) and isinstance(answers[1][0], Late)
    b_run = answers[1][1]
    assert isinstance(b_run, Answer)
    alone = RowsRunner(teacher.forward_pixels).answers(staged[1].select([1, 2]), [JobShape(2, 8)])
    assert torch.equal(b_run.logits, alone[0].logits)


def test_a_worker_refuses_unbilled_what_the_device_found_too_late_and_learns_its_estimate(
    teacher: MaskedTeacher,
) -> None:
    """A worker that never ran a forward knows nothing of its cost and sends every request; the device, whose forward
    is slow, finds it too late: the caller gets DEADLINE_EXCEEDED, nothing reaches the forward or the commit, and the
    worker takes the device's estimate for its own, so its refusals say when to retry and admission can refuse the
    next such request before reading it (float32, CPU)."""
    device, gate, _, forwards = held_device(teacher)
    gate.set()
    device.compute.observe(100, 1.0)  # the first batch is taken for set-up and not counted
    device.compute.observe(100, 20.0)  # this device's forward: 0.2 s a token
    committed: list[object] = []

    def finalize(jobs: object, answers: object, stats: object) -> list[None]:
        committed.append(jobs)
        return [None] * len(jobs)  # type: ignore[arg-type]

    async def worker(here: Connection) -> tuple[list[DeadlineUnmetError], float, float]:
        stager = Stager(teacher.geometry, max_images=4, device=CPU, allocate=shared_host_tensor)
        batcher = TokenBudgetBatcher(
            RemoteRows(here, os.getpid()),
            stager=stager,
            num_prefix_tokens=1,
            token_budget=10_000,
            max_batch_images=4,
            max_delay_s=0.001,
            finalize=finalize,
        )
        await batcher.start()
        x = request(1, 8, 40)
        refusals = []
        try:
            for _ in range(2):  # the worker's first observation is its set-up, as the device's was
                with pytest.raises(DeadlineUnmetError) as refused:
                    await batcher.submit(x, deadline=time.monotonic() + 1.0)
                refusals.append(refused.value)
            return refusals, batcher.compute.seconds(batcher.tokens_of(x)), device.compute.seconds(9)
        finally:
            await batcher.close()

    with serving(device, 1) as (here,):
        refusals, learned, device_s = asyncio.run(worker(here))
    assert forwards == [] and committed == []  # nothing ran, nothing was committed
    assert device_s == pytest.approx(1.8) and learned >= device_s  # 9 tokens: 8 kept patches and the class token
    (retry,) = refusals[-1].details
    assert retry.retry_delay.ToTimedelta().total_seconds() >= device_s
