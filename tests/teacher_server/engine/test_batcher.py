"""TokenBudgetBatcher on its own: when batches are sealed, how rows of different keep counts run, the stage/forward/
commit pipeline, deadlines, errors, close. Rows are staged as uint8 pixels, as a server stages them."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest
import timm
import torch
from google.rpc.error_details_pb2 import RetryInfo
from service_testkit import MODEL, TINY, random_keep

from maskedkd.geometry import TeacherGeometry
from maskedkd.masked_teacher import MaskedTeacher
from teacher_server.engine.batching.batch_job import BatchJob, BatchStats
from teacher_server.engine.batching.batcher import TokenBudgetBatcher
from teacher_server.engine.rows.answers import Answer
from teacher_server.engine.rows.decode import DecodedInput
from teacher_server.engine.rows.rows_runner import RowsRunner, run_bucketed, run_padded
from teacher_server.engine.rows.staging import StagedRows, Stager
from teacher_server.errors import DeadlineUnmetError, ServiceUnavailableError
from teacher_server.ingest.class_backlog import ClassBacklog

pytestmark = [pytest.mark.dtype("float32"), pytest.mark.timeout(60)]

# 1-channel 2x2 patches on a 8x8 grid: small rows whose sums are easy to check
GEOMETRY = TeacherGeometry((16, 16), 2, 1, num_prefix_tokens=1, num_classes=1, mean=(0.5,), std=(0.5,))
POISON = 255  # a pixel value RecordingForward fails on


class RecordingForward:
    """A real (if simple) teacher: logit = sum of the kept pixel values of each row; records every call's shape,
    thread and time; optionally slow."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.calls: list[tuple[int, int, bool]] = []  # (rows, K, with counts)
        self.spans: list[tuple[float, float]] = []  # (start, end) of each call
        self.threads: set[str] = set()
        self.torch_threads: set[int] = set()  # torch's thread count on the forward's thread
        self.seconds = seconds

    def __call__(self, pixels: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
        start = time.monotonic()
        self.threads.add(threading.current_thread().name)
        self.torch_threads.add(torch.get_num_threads())
        self.calls.append((pixels.shape[0], pixels.shape[1], counts is not None))
        k = pixels.shape[1]
        valid = torch.ones(pixels.shape[:2]) if counts is None else (torch.arange(k) < counts[:, None]).float()
        if bool((pixels.flatten(2).float() * valid[..., None] == POISON).any()):  # padding may hold anything
            raise RuntimeError("poisoned input")
        time.sleep(self.seconds)
        self.spans.append((start, time.monotonic()))
        return (pixels.flatten(2).float().sum(-1) * valid).sum(1, keepdim=True)  # [G, 1]


def decoded(batch: int, k: int, fill: int = 1, counts: list[int] | None = None) -> DecodedInput:
    pixels = torch.full((batch, k, 1, 2, 2), fill, dtype=torch.uint8)  # [B, K, C, P, P]
    keep = random_keep(batch, k, seed=batch * 100 + k)  # on a grid of 64, as GEOMETRY's
    counts_t = torch.tensor(counts if counts is not None else [k] * batch)
    return DecodedInput("patches", pixels, keep, counts_t, bytes(pixels.numel()))


def make(forward: RecordingForward, **kw: object) -> TokenBudgetBatcher:
    args: dict[str, object] = {
        "num_prefix_tokens": 1,
        "token_budget": 10_000,
        "max_batch_images": 64,
        "max_delay_s": 0.2,
        **kw,
    }
    stager = Stager(GEOMETRY, max_images=int(args["max_batch_images"]), device=torch.device("cpu"))  # type: ignore[call-overload]
    runner = RowsRunner(forward, mixed_k=args.pop("mixed_k", "bucket"))  # type: ignore[arg-type]
    return TokenBudgetBatcher(runner, stager=stager, **args)  # type: ignore[arg-type]


async def test_same_k_requests_concatenate_into_one_unpadded_forward() -> None:
    fwd = RecordingForward()
    b = make(fwd)
    await b.start()
    results = await asyncio.gather(*(b.submit(decoded(n, 6, fill=n)) for n in (1, 2, 3)))
    await b.close()
    assert fwd.calls == [(6, 6, False)]
    assert fwd.threads == {"forward-teacher_0"}  # the forward runs on its own thread, not the event loop's
    for n, r in zip((1, 2, 3), results, strict=True):
        assert r.stats.images == 6 and r.stats.tokens == 6 * 7
        assert torch.equal(r.logits, torch.full((n, 1), n * 6 * 4.0))


async def test_only_the_forward_thread_runs_torch_on_the_processs_threads() -> None:
    """Staging and committing run torch on one thread each, so the forward's OpenMP team stays the only one
    (maskedkd/torch_threads.py); the forward keeps what a new thread gets (float32, CPU)."""
    fwd = RecordingForward()
    seen: dict[str, int] = {}

    def finalize(jobs: Sequence[BatchJob], answers: Sequence[Answer], stats: BatchStats) -> list[None]:
        seen["commit"] = torch.get_num_threads()
        return [None] * len(jobs)

    b = make(fwd, finalize=finalize)
    original_stage = b._stager.stage

    def stage(*args: Any) -> Any:
        seen["stage"] = torch.get_num_threads()
        return original_stage(*args)

    b._stager.stage = stage  # type: ignore[method-assign]  # records the staging thread's count, then stages
    await b.start()
    await b.submit(decoded(2, 6))
    await b.close()
    fresh = await asyncio.to_thread(torch.get_num_threads)  # what a thread nobody set up gets
    assert seen == {"stage": 1, "commit": 1}
    assert fwd.torch_threads == {fresh}


async def test_token_budget_and_image_cap_seal_batches() -> None:
    fwd = RecordingForward()
    b = make(fwd, token_budget=2 * 9 * 2)  # two 2-image requests of K=8 (+1 prefix) fill it
    await b.start()
    await asyncio.gather(*(b.submit(decoded(2, 8)) for _ in range(5)))
    await b.close()
    assert [rows for rows, _, _ in fwd.calls] == [4, 4, 2]

    fwd = RecordingForward()
    b = make(fwd, max_batch_images=3)
    await b.start()
    await asyncio.gather(*(b.submit(decoded(1, 4)) for _ in range(7)))
    await b.close()
    assert [rows for rows, _, _ in fwd.calls] == [3, 3, 1]


async def test_max_delay_gathers_late_arrivals_and_bounds_the_wait_of_a_lone_request() -> None:
    fwd = RecordingForward()
    b = make(fwd, max_delay_s=0.3)
    await b.start()
    first = asyncio.create_task(b.submit(decoded(1, 4)))
    await asyncio.sleep(0.1)  # well inside the delay: joins the open batch
    second = asyncio.create_task(b.submit(decoded(1, 4)))
    await asyncio.gather(first, second)
    assert fwd.calls == [(2, 4, False)]
    loop = asyncio.get_running_loop()
    started = loop.time()
    await b.submit(decoded(1, 4))
    waited = loop.time() - started
    await b.close()
    assert fwd.calls[1] == (1, 4, False) and 0.25 < waited < 5


async def test_mixed_keep_counts_bucket_or_pad() -> None:
    mixed = [decoded(2, 8, counts=[8, 3]), decoded(1, 5), decoded(2, 3)]
    for strategy, expected in (("bucket", [(3, 3, False), (1, 5, False), (1, 8, False)]), ("pad", [(5, 8, True)])):
        fwd = RecordingForward()
        b = make(fwd, mixed_k=strategy)
        await b.start()
        results = await asyncio.gather(*(b.submit(p) for p in mixed))
        await b.close()
        assert sorted(fwd.calls) == sorted(expected), strategy
        assert [r.logits.flatten().tolist() for r in results] == [[32.0, 12.0], [20.0], [12.0, 12.0]]


def test_bucketing_and_padding_of_staged_pixels_match_each_request_alone_on_a_real_teacher() -> None:
    """uint8 rows (raw 0..255 pixels, normalized inside the patch projection) against timm-normalized float32 patches
    run one request at a time through `forward_patches`."""
    teacher = MaskedTeacher(timm.create_model(MODEL, pretrained=False, depth=3, **TINY).eval())
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (6, 20, 3, 4, 4), dtype=torch.uint8, generator=g)  # [B, K, C, P, P]
    mean, std = (torch.tensor(v).view(1, 1, 3, 1, 1) for v in (teacher.geometry.mean, teacher.geometry.std))
    normalized = (pixels.float() / 255.0 - mean) / std
    keep = random_keep(6, 20, seed=5)
    counts = torch.tensor([20, 5, 12, 20, 5, 9])
    rows = StagedRows(pixels, keep, counts, uniform=False, slot=0)
    with torch.inference_mode():
        alone = torch.cat(
            [
                teacher.forward_patches(normalized[i : i + 1, :c], keep[i : i + 1, :c])
                for i, c in enumerate(counts.tolist())
            ]
        )
        bucketed = run_bucketed(teacher.forward_pixels, rows)
        padded = run_padded(teacher.forward_pixels, rows)
    torch.testing.assert_close(bucketed, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.dtype("none")
def test_a_lone_uint8_request_is_read_in_place_and_equals_its_copy() -> None:
    """uint8, CPU: `in_place`, a batch of one request of patches (uniform or ragged) is its own rows, not a copy, and
    equal to what a copying stager stages; a batch of two requests and float pixels are copied as before; in place is
    refused where another process or device reads the rows."""
    cpu = torch.device("cpu")
    in_place = Stager(GEOMETRY, max_images=8, device=cpu, in_place=True)
    copying = Stager(GEOMETRY, max_images=8, device=cpu)
    pixels = torch.randint(0, 256, (3, 6, 1, 2, 2), dtype=torch.uint8)  # [B, K, C, P, P]
    for counts in ([6, 6, 6], [6, 2, 4]):
        lone = DecodedInput("patches", pixels, random_keep(3, 6, seed=1), torch.tensor(counts), b"")
        rows, copied = in_place.stage([lone], in_place.acquire()), copying.stage([lone], copying.acquire())
        assert rows.pixels.data_ptr() == pixels.data_ptr() and copied.pixels.data_ptr() != pixels.data_ptr()
        for got, want in ((rows.pixels, copied.pixels), (rows.indices, copied.indices), (rows.counts, copied.counts)):
            assert torch.equal(got, want)
        assert rows.uniform == copied.uniform == (counts == [6, 6, 6])
        in_place.release(rows.slot)
        copying.release(copied.slot)
    two = in_place.stage([decoded(2, 6), decoded(1, 6, fill=3)], in_place.acquire())
    assert two.pixels.data_ptr() != pixels.data_ptr() and two.pixels[2].eq(3).all()
    floats = DecodedInput("patches", pixels.float() / 255, random_keep(3, 6, seed=1), torch.tensor([6] * 3), b"")
    staged = in_place.stage([floats], in_place.acquire())
    assert staged.pixels.dtype == torch.float32 and torch.allclose(staged.pixels, pixels.float())  # 0..255 scale
    with pytest.raises(ValueError, match="in this process on the CPU"):
        Stager(GEOMETRY, max_images=8, device=cpu, in_place=True, allocate=lambda n, d: torch.empty(n, dtype=d))


async def test_the_next_batch_is_staged_while_the_current_forward_runs() -> None:
    fwd = RecordingForward(seconds=0.5)
    b = make(fwd, max_batch_images=4, max_delay_s=0.05)
    staged_at: list[float] = []
    stage = b._stage

    def spy(jobs, slot):  # type: ignore[no-untyped-def]
        staged_at.append(time.monotonic())
        assert threading.current_thread().name.startswith("stage-")
        return stage(jobs, slot)

    b._stage = spy  # type: ignore[method-assign]
    await b.start()
    first = asyncio.ensure_future(b.submit(decoded(4, 4, fill=1)))  # fills the cap: sealed at once
    await asyncio.sleep(0.1)
    second = [asyncio.ensure_future(b.submit(decoded(2, 4, fill=v))) for v in (2, 3)]  # fill it while the first runs
    results = await asyncio.gather(first, *second)
    await b.close()
    (s1, e1), _ = fwd.spans
    assert [n for n, _, _ in fwd.calls] == [4, 4]
    assert len(staged_at) == 2 and s1 < staged_at[1] < e1  # the second batch was staged during the first forward
    for r, fill, n in zip(results, (1, 2, 3), (4, 2, 2), strict=True):
        assert torch.equal(r.logits, torch.full((n, 1), fill * 16.0))


async def test_a_caller_gone_before_its_forward_is_not_run() -> None:
    fwd = RecordingForward(seconds=0.5)
    b = make(fwd, max_batch_images=4, max_delay_s=0.05)
    await b.start()
    first = asyncio.ensure_future(b.submit(decoded(4, 4, fill=1)))
    await asyncio.sleep(0.1)
    leaving = asyncio.ensure_future(b.submit(decoded(2, 4, fill=2)))
    staying = asyncio.ensure_future(b.submit(decoded(2, 4, fill=3)))
    await asyncio.sleep(0.1)
    leaving.cancel()
    await first
    result = await staying
    await b.close()
    assert [n for n, _, _ in fwd.calls] == [4, 2]  # only the caller still there ran
    assert torch.equal(result.logits, torch.full((2, 1), 3 * 16.0))


async def test_a_request_whose_deadline_passes_in_the_queue_is_dropped_unrun() -> None:
    fwd = RecordingForward(seconds=0.4)
    b = make(fwd, max_batch_images=4, max_delay_s=0.01)
    await b.start()
    busy = asyncio.ensure_future(b.submit(decoded(4, 4)))  # occupies the forward for 0.4 s
    await asyncio.sleep(0.05)
    late = asyncio.ensure_future(b.submit(decoded(1, 4, fill=7), deadline=time.monotonic() + 0.2))
    patient = asyncio.ensure_future(b.submit(decoded(1, 4, fill=5), deadline=time.monotonic() + 30))
    with pytest.raises(DeadlineUnmetError) as refused:
        await late
    (retry,) = refused.value.details  # when to try again, as a refusal at admission says it
    assert isinstance(retry, RetryInfo) and retry.retry_delay.ToTimedelta().total_seconds() > 0
    assert (await patient).logits.item() == 5 * 16.0
    await busy
    await b.close()
    assert [n for n, _, _ in fwd.calls] == [4, 1]  # the late request never reached the forward


async def test_a_failing_batch_fails_its_requests_only_and_close_drains_the_queue() -> None:
    fwd = RecordingForward()
    b = make(fwd, max_delay_s=0.05)
    await b.start()
    bad, good = await asyncio.gather(
        b.submit(decoded(1, 4, fill=POISON)), b.submit(decoded(1, 4)), return_exceptions=True
    )
    assert isinstance(bad, RuntimeError) and isinstance(good, RuntimeError)  # same micro-batch, same fate
    later = await b.submit(decoded(1, 4))
    assert later.logits.item() == 16.0  # the batcher survived
    queued = [asyncio.create_task(b.submit(decoded(1, 4))) for _ in range(3)]
    await asyncio.sleep(0)
    await b.close()
    assert all(t.done() and t.result().logits.item() == 16.0 for t in queued)
    with pytest.raises(ServiceUnavailableError):
        await b.submit(decoded(1, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.dtype("float32", device="cuda")
@torch.inference_mode()
def test_cuda_rows_staged_from_pinned_uint8_run_through_the_served_forward() -> None:
    """Rows staged into pinned host buffers and copied to the device as uint8 on a side stream give the logits of
    the same rows run on the host teacher."""
    from teacher_server.engine.served_model import make_forward

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, num_classes=10)
    host = MaskedTeacher(model.eval())
    device_teacher = MaskedTeacher(
        timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, num_classes=10).eval()
    )
    device_teacher.load_state_dict(host.state_dict())
    device_teacher.to("cuda")
    g = torch.Generator().manual_seed(0)
    inputs = [
        DecodedInput(
            "patches",
            torch.randint(0, 256, (b, k, 3, 4, 4), dtype=torch.uint8, generator=g),
            random_keep(b, k, seed=k),
            torch.full((b,), k),
            b"",
        )
        for b, k in ((3, 32), (2, 16), (4, 32))
    ]
    stager = Stager(host.geometry, max_images=16, device=torch.device("cuda"))
    rows = stager.stage(inputs, stager.acquire())
    assert rows.pixels.is_cuda and rows.pixels.dtype == torch.uint8
    torch.cuda.current_stream().wait_event(rows.ready)
    host_rows = Stager(host.geometry, max_images=16, device=torch.device("cpu"))
    cpu_rows = host_rows.stage(inputs, host_rows.acquire())
    forward = make_forward(device_teacher, torch.device("cuda"), torch.float32)
    for run in (run_bucketed, run_padded):
        expected = run(host.forward_pixels, cpu_rows)
        torch.testing.assert_close(run(forward, rows), expected, atol=1e-4, rtol=1e-4)


async def test_a_batch_holds_the_teacher_about_max_batch_s_at_most_while_keys_share_it() -> None:
    """Every forward takes 50 ms (RecordingForward sleeps), so once the running estimate has seen it, `max_batch_s`
    = 30 ms caps each batch at the one request it starts with: four requests of four keys sent together run as four
    batches. A key alone is capped only at 1 s (`LONE_BATCH_S`): its four requests sent together share one batch, as
    they would without the cap (nobody waits behind it)."""
    fwd = RecordingForward(seconds=0.05)
    b = make(fwd, max_delay_s=0.0, max_batch_s=0.03, token_budget=10_000)
    await b.start()
    for _ in range(3):  # teach the estimate: 50 ms per 7-token batch (the first one is not counted)
        await b.submit(decoded(1, 6))
    assert b.compute.seconds(7) == pytest.approx(0.05, rel=0.3)
    sizes_before = len(fwd.calls)
    await asyncio.gather(*(b.submit(decoded(1, 6)) for _ in range(4)))  # key 0 alone
    # The estimate says a batch of any size over 7 tokens takes > 30 ms: while keys share the teacher, every batch
    # holds the one request it starts with, however many are queued.
    await asyncio.gather(*(b.submit(decoded(1, 6), key_id=key) for key in range(1, 5)))
    assert [rows for rows, _, _ in fwd.calls[sizes_before:]] == [4, 1, 1, 1, 1]
    await b.close()


async def test_a_worker_counts_per_class_what_it_takes_in_and_what_it_lets_go_unrun() -> None:
    """An ingest worker's batcher counts, per priority class, the requests it takes in and those it lets go unrun
    (dropped for their deadline, their caller gone): what it took in and kept is what it handed to the forward
    (float32, CPU)."""
    backlog = ClassBacklog(multiprocessing.get_context("spawn"), 1)
    fwd = RecordingForward(seconds=0.4)
    b = make(fwd, max_batch_images=4, max_delay_s=0.01, backlog=backlog.writer(0))
    await b.start()
    running = asyncio.ensure_future(b.submit(decoded(4, 4), priority="batch"))  # runs at once, for 0.4 s
    await asyncio.sleep(0.1)
    nxt = asyncio.ensure_future(b.submit(decoded(4, 4, fill=2), priority="interactive"))
    late = asyncio.ensure_future(b.submit(decoded(1, 4), priority="standard", deadline=time.monotonic() + 0.1))
    gone = asyncio.ensure_future(b.submit(decoded(1, 4), priority="batch"))
    await asyncio.sleep(0.05)
    assert backlog.kept(0) == (1, 1, 2)  # interactive, standard, batch
    gone.cancel()
    await running
    with pytest.raises(DeadlineUnmetError):
        await late
    assert (await nxt).logits[0].item() == 2 * 16.0
    await b.close()
    assert [n for n, _, _ in fwd.calls] == [4, 4]  # the batch request, then the interactive one
    assert backlog.kept(0) == (1, 0, 1)


async def test_a_worker_tells_each_batch_it_forms_and_each_it_never_sends() -> None:
    """An ingest worker's batcher tells its backlog each batch it forms (its best class and that class's smallest
    start tag) and each formed batch it never hands to the teacher (its callers all left before the forward), so
    the device does not wait for a call that will not come (float32, CPU)."""
    backlog = ClassBacklog(multiprocessing.get_context("spawn"), 1)
    gate = threading.Event()
    fwd = RecordingForward()

    def gated(pixels: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
        gate.wait(30)
        return fwd(pixels, idx, counts)

    b = make(fwd, max_batch_images=4, max_delay_s=0.01, backlog=backlog.writer(0))
    b.runner = RowsRunner(gated)
    await b.start()
    running = asyncio.ensure_future(b.submit(decoded(4, 4), priority="batch", key_id=1))  # held at the gate
    await asyncio.sleep(0.1)
    leaving = asyncio.ensure_future(b.submit(decoded(2, 4), priority="interactive", key_id=2))
    await asyncio.sleep(0.1)  # formed behind the held forward
    count, rank, tag = backlog.formed(0)
    # key 2 starts at the virtual time: key 1's service, 4 images x (4 kept patches + the class token) = 20 tokens
    assert (count, rank, tag) == (2, 0, 20.0)
    leaving.cancel()
    gate.set()
    await running
    await b.close()
    assert [n for n, _, _ in fwd.calls] == [4]  # the second batch never ran
    assert backlog.formed(0)[0] == 1  # two formed, one of them never sent
