"""Requests larger than a batch may hold, run as chunks of whole images in consecutive batches: another key's request
runs between the chunks, the caller gets one answer with its rows in order, the commit sees the whole request once,
and a caller gone or a deadline that cannot be met before the last chunk leaves nothing billed. First on the batcher
alone (float32, CPU; `RecordingForward`'s logit of a row is the sum of its kept pixels, so each row's answer says
which row it is), then through real gRPC on 127.0.0.1 against the in-process teacher and the ledger read back with
SQL (float32, CPU)."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Sequence

import pytest
import service_testkit as kit
import torch
from prometheus_client.parser import text_string_to_metric_families
from service_testkit import Reference, auth, image_request, random_images, random_keep, stub
from test_batcher import RecordingForward, make

from maskedkd.codec import proto_to_tensor
from maskedkd.masked_teacher import MaskedTeacher
from maskedkd.teacher_outputs import OutputChoice, forward_with_outputs
from teacher_server.engine.batching.batch_job import BatchJob, BatchStats
from teacher_server.engine.batching.batcher import TokenBudgetBatcher
from teacher_server.engine.batching.split_requests import (
    LONE_BATCH_S,
    MIN_CHUNK_TOKENS,
    RecentSenders,
    image_ranges,
    shaped_ranges,
)
from teacher_server.engine.rows.answers import Answer, OutputsRequest, job_outputs, joined_answer
from teacher_server.engine.rows.decode import DecodedInput
from teacher_server.errors import DeadlineUnmetError
from teacher_server.testing.server import running_server

pytestmark = [pytest.mark.dtype("float32", device="cpu"), pytest.mark.timeout(120)]

K = 16  # kept patches a row: a row is K + 1 teacher tokens


def numbered(batch: int, first: int = 1) -> DecodedInput:
    """`batch` rows of K patches; row i's pixels all equal first + i, so its logit is (first + i) * K * 4."""
    fill = torch.arange(first, first + batch, dtype=torch.uint8).view(batch, 1, 1, 1, 1)
    pixels = fill.expand(batch, K, 1, 2, 2).contiguous()  # [B, K, C, P, P]
    keep = random_keep(batch, K, seed=batch)
    return DecodedInput("patches", pixels, keep, torch.full((batch,), K), bytes(pixels.numel()))


def expected(batch: int, first: int = 1) -> torch.Tensor:
    return (torch.arange(first, first + batch, dtype=torch.float32) * K * 4).view(batch, 1)  # [B, 1]


class Commits:
    """A `finalize` that records what each commit was handed: (images of each job, rows of each answer)."""

    def __init__(self) -> None:
        self.seen: list[list[tuple[int, int]]] = []

    def __call__(self, jobs: Sequence[BatchJob], answers: Sequence[Answer], stats: BatchStats) -> list[None]:
        self.seen.append([(j.images, int(a.logits.shape[0])) for j, a in zip(jobs, answers, strict=True)])
        return [None] * len(jobs)


async def taught(fwd: RecordingForward, commits: Commits, *, key_id: int = 0) -> TokenBudgetBatcher:
    """A batcher whose every batch holds one request at most (each forward takes 200 ms, the bound is 100 ms), its
    compute estimate taught by three one-row requests of `key_id` (key 0: another key than the tests' own, which so
    share the teacher with it and have their large requests cut)."""
    b = make(fwd, max_delay_s=0.0, max_batch_s=0.1, finalize=commits)
    await b.start()
    for _ in range(3):
        await b.submit(numbered(1), key_id=key_id)
    fwd.calls.clear()
    commits.seen.clear()
    return b


BIG = 64  # rows: 64 x 17 = 1,088 tokens, over MIN_CHUNK_TOKENS twice: three chunks of 22, 21, 21


def test_image_ranges_cover_every_image_in_near_equal_chunks_within_the_budget() -> None:
    assert image_ranges(torch.full((256,), 1), 100) == [(0, 86), (86, 171), (171, 256)]
    ragged = torch.tensor([5, 1, 1, 9, 2, 2, 7, 3, 1, 8])
    ranges = image_ranges(ragged, 12)
    assert [r[0] for r in ranges[1:]] == [r[1] for r in ranges[:-1]] and ranges[0][0] == 0 and ranges[-1][1] == 10
    assert len(ranges) == 4  # 39 tokens at 12 a chunk
    assert all(int(ragged[a:b].sum()) <= 12 + int(ragged[a:b].max()) for a, b in ranges)  # a share, plus one image
    assert image_ranges(torch.tensor([3, 3]), 100) == [(0, 2)]
    assert image_ranges(torch.tensor([50, 50, 50]), 1) == [(0, 1), (1, 2), (2, 3)]


def test_on_prepared_batch_sizes_chunks_take_the_largest_size_that_fits() -> None:
    per_image = torch.full((256,), 99)  # DeiT-S at keep 50%: 98 patches + the class token
    assert shaped_ranges(per_image, 99 * 100, [64, 128, 256]) == [(0, 64), (64, 128), (128, 192), (192, 256)]
    assert shaped_ranges(per_image, 99 * 200, [64, 128, 256]) == [(0, 128), (128, 256)]
    assert shaped_ranges(per_image[:70], 99 * 10, [32, 64]) == [(0, 32), (32, 64), (64, 70)]  # none fits: the smallest


async def test_a_large_request_runs_in_chunks_with_another_keys_request_between_them() -> None:
    assert BIG * (K + 1) > 2 * MIN_CHUNK_TOKENS
    fwd, commits = RecordingForward(seconds=0.2), Commits()
    b = await taught(fwd, commits)
    big = asyncio.ensure_future(b.submit(numbered(BIG), key_id=1))
    await asyncio.sleep(0.05)  # its first chunk is in the forward
    small = asyncio.ensure_future(b.submit(numbered(1, first=200), key_id=2))
    answered, other = await asyncio.gather(big, small)
    await b.close()
    assert [rows for rows, _, _ in fwd.calls] == [22, 1, 21, 21]  # the other key waited for one chunk, not for 64 rows
    assert torch.equal(answered.logits, expected(BIG))  # one answer, every row in order
    assert torch.equal(other.logits, expected(1, first=200))
    assert sorted(commits.seen) == [[(1, 1)], [(BIG, BIG)]]  # committed once, whole, with its last chunk


async def test_a_key_alone_runs_requests_whole_up_to_a_second_of_forward_and_cut_once_another_key_sends() -> None:
    """Taught on 64-row requests of 0.3 s, the estimate runs 3,626 tokens in `LONE_BATCH_S` (1 s) and 362 in the
    100 ms bound. A key alone runs a 64-row request (1,088 tokens) whole and a 240-row one (4,080) in two chunks: a
    key starting to send would wait about 1 s at most. Once another key has sent, 64 rows run in chunks of the
    512-token floor."""
    assert LONE_BATCH_S == 1.0
    fwd = RecordingForward(seconds=0.3)
    b = make(fwd, max_delay_s=0.0, max_batch_s=0.1, max_batch_images=256)
    await b.start()
    for _ in range(3):
        await b.submit(numbered(BIG), key_id=1)
    fwd.calls.clear()
    alone = await b.submit(numbered(BIG), key_id=1)
    longer = await b.submit(numbered(240), key_id=1)
    await b.submit(numbered(1, first=250), key_id=2)
    shared = await b.submit(numbered(BIG), key_id=1)
    await b.close()
    assert [rows for rows, _, _ in fwd.calls] == [BIG, 120, 120, 1, 22, 21, 21]
    assert torch.equal(alone.logits, expected(BIG)) and torch.equal(shared.logits, expected(BIG))
    assert torch.equal(longer.logits, expected(240))


async def test_a_key_alone_still_has_a_request_over_the_token_budget_cut_to_it() -> None:
    fwd = RecordingForward()
    b = make(fwd, max_delay_s=0.0, max_batch_s=0.1, token_budget=600)
    await b.start()
    answered = await b.submit(numbered(BIG), key_id=1)  # 1,088 tokens, alone: the time bound does not apply
    await b.close()
    assert [rows for rows, _, _ in fwd.calls] == [32, 32]  # the token budget does: two chunks of 544 tokens
    assert torch.equal(answered.logits, expected(BIG))


def test_keys_share_the_teacher_while_another_sent_within_the_window_or_still_has_requests_queued() -> None:
    senders, queued = RecentSenders(window_s=10.0), {3: 0}
    senders.sent(1, 0.0)
    assert not senders.several(0.0, queued.get)  # alone
    senders.sent(1, 5.0)
    assert not senders.several(5.0, queued.get)  # still alone
    senders.sent(2, 6.0)
    assert senders.several(6.0, queued.get) and senders.several(15.0, queued.get)  # key 2 sent 9 s before
    assert not senders.several(16.5, queued.get)  # key 2 idle for 10.5 s: forgotten, key 1 alone again
    senders.sent(3, 17.0)
    queued[3] = 40  # key 3 still has requests queued after the window: it still shares the teacher
    senders.sent(1, 30.0)
    assert senders.several(30.0, queued.get)
    queued[3] = 0
    senders.sent(1, 31.0)
    assert not senders.several(31.0, queued.get)


async def test_a_caller_gone_between_chunks_is_neither_run_further_nor_committed() -> None:
    fwd, commits = RecordingForward(seconds=0.2), Commits()
    b = await taught(fwd, commits)
    big = asyncio.ensure_future(b.submit(numbered(BIG), key_id=1))
    await asyncio.sleep(0.05)
    big.cancel()
    after = await b.submit(numbered(2, first=9), key_id=2)
    await b.close()
    assert [rows for rows, _, _ in fwd.calls] == [22, 2]  # its later chunks were let go unrun
    assert commits.seen == [[(2, 2)]]  # nothing of it billed
    assert torch.equal(after.logits, expected(2, first=9))


async def test_a_request_whose_chunks_cannot_all_end_before_its_deadline_runs_none() -> None:
    fwd, commits = RecordingForward(seconds=0.2), Commits()
    b = await taught(fwd, commits)
    with pytest.raises(DeadlineUnmetError):  # three 200 ms chunks cannot end within 0.5 s: the first is not started
        await b.submit(numbered(BIG), key_id=1, deadline=time.monotonic() + 0.5)
    fits = await b.submit(numbered(BIG), key_id=1, deadline=time.monotonic() + 30)
    await b.close()
    assert [rows for rows, _, _ in fwd.calls] == [22, 21, 21]
    assert commits.seen[-1] == [(BIG, BIG)] and len(commits.seen) == 1
    assert torch.equal(fits.logits, expected(BIG))


@torch.inference_mode()
def test_extra_outputs_of_chunks_join_into_those_of_the_whole_request() -> None:
    """The tiny ViT (float32, CPU): pre-logits, kept tokens and class attention of a 6-image request run as chunks of
    3 and 3 (separate forwards) and joined equal those of one forward of all 6."""
    teacher = MaskedTeacher(kit.tiny_vit(seed=5).eval())
    keep = random_keep(6, 24, seed=6)
    patches = kit.patches_of(random_images(6, seed=7), keep).float()  # [6, 24, 3, 4, 4] on the 0..255 scale
    choice = OutputChoice(True, True, "heads")
    asked = OutputsRequest(choice)

    def answer(rows: slice) -> Answer:
        out = forward_with_outputs(teacher, patches[rows], keep[rows], None, choice)
        n = int(out.logits.shape[0])
        return Answer(out.logits.float(), job_outputs(out, slice(0, n), 24, asked, torch.float32))

    whole, joined = answer(slice(0, 6)), joined_answer([answer(slice(0, 3)), answer(slice(3, 6))])
    torch.testing.assert_close(joined.logits, whole.logits, **kit.CLOSE)
    assert whole.outputs is not None and joined.outputs is not None
    for name in ("pre_logits", "patch_tokens", "cls_attention"):
        got, want = proto_to_tensor(getattr(joined.outputs, name)), proto_to_tensor(getattr(whole.outputs, name))
        assert got.shape == want.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-4, atol=5e-5)


def test_a_split_request_through_the_server_is_answered_billed_and_replayed_as_one(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A 1 ms batch bound splits a 48-image request (25 tokens an image: 1,200 tokens) of a key sharing the teacher
    into chunks of about MIN_CHUNK_TOKENS: its logits equal the in-process teacher's, its one ledger row bills the FLOP
    model of all 48 images, its batch was one chunk's, and the retry replays it bit for bit."""
    model = kit.tiny_vit(seed=21)
    settings = kit.settings(tmp_path, dtype="float32", max_batch_ms=1.0, max_delay_ms=0.0, metrics_port=0)
    with running_server(settings, model=model) as srv:
        key, other = srv.create_key("big"), srv.create_key("other")
        channel, teacher = stub(srv.address)
        for i in range(3):  # teach the compute estimate (the first batch is not counted); another key: shared
            teacher.Infer(image_request(random_images(2, seed=i), random_keep(2, 24, seed=i)), metadata=auth(other))
        images, keep = random_images(48, seed=30), random_keep(48, 24, seed=31)
        first = teacher.Infer(image_request(images, keep, request_id="big-1"), metadata=auth(key))
        again = teacher.Infer(image_request(images, keep, request_id="big-1"), metadata=auth(key))
        channel.close()
        ref = Reference(model)
        torch.testing.assert_close(proto_to_tensor(first.logits), ref.logits(images, keep), **kit.CLOSE)
        (row,) = [r for r in kit.ledger_rows(srv.settings.db) if r["request_id"] == "big-1"]
        assert srv.metrics_url is not None
        text = urllib.request.urlopen(srv.metrics_url, timeout=10).read().decode()
    counted = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name in ("maskedkd_split_requests_total", "maskedkd_split_chunks_total")
    }
    assert counted == {"maskedkd_split_requests_total": 1, "maskedkd_split_chunks_total": 48 // row["batch_images"]}
    assert (row["images"], row["gflops"]) == (48, pytest.approx(ref.gflops([24] * 48), rel=1e-12))
    assert row["batch_images"] < 48  # it ran in chunks; its last chunk's batch is on the row
    assert not first.usage.replayed and again.usage.replayed and again.logits.data == first.logits.data
