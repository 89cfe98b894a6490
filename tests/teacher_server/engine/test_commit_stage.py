"""The commit leaves the forward thread: batch i+1's forward runs while batch i commits, and no caller gets its
result before its batch's commit returned (the batcher alone, then a real server whose ledger commits slowly: every
answer's row is already visible to an independent SQL reader when the answer arrives)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from service_testkit import auth, image_request, random_images, random_keep, settings, stub, tiny_vit
from sqlalchemy import event
from test_batcher import RecordingForward, decoded, make

from teacher_server.ledger.models import UsageRecord
from teacher_server.testing.server import running_server

pytestmark = [pytest.mark.dtype("float32"), pytest.mark.timeout(120)]

COMMIT_S = 0.4


async def test_the_next_forward_overlaps_the_commit_and_results_wait_for_their_commit() -> None:
    forward_starts: list[float] = []
    commits: list[tuple[float, float, int]] = []  # (start, end, images)
    fwd = RecordingForward()

    def timed_forward(patches, idx, counts):  # type: ignore[no-untyped-def]
        forward_starts.append(time.monotonic())
        return fwd(patches, idx, counts)

    def slow_finalize(jobs, logits, stats):  # type: ignore[no-untyped-def]
        start = time.monotonic()
        time.sleep(COMMIT_S)
        commits.append((start, time.monotonic(), stats.images))
        return [f"committed-{stats.images}"] * len(jobs)

    b = make(timed_forward, finalize=slow_finalize, max_delay_s=0.0)  # type: ignore[arg-type]
    await b.start()
    arrived: dict[int, float] = {}

    async def call(images: int) -> str:
        result = await b.submit(decoded(images, 4))
        arrived[images] = time.monotonic()
        return str(result.finalized)

    first = asyncio.create_task(call(1))
    await asyncio.sleep(0.1)  # batch 1's forward is done, its commit is sleeping
    second = asyncio.create_task(call(2))
    assert await first == "committed-1" and await second == "committed-2"
    await b.close()
    assert [c[2] for c in commits] == [1, 2]  # commits in forward order
    assert commits[0][0] < forward_starts[1] < commits[0][1]  # forward 2 ran during commit 1
    assert commits[1][0] >= commits[0][1]  # one commit at a time
    assert arrived[1] >= commits[0][1] and arrived[2] >= commits[1][1]  # no result before its commit


def test_a_slow_ledger_commit_never_lets_an_answer_out_before_its_row(tmp_path) -> None:
    with running_server(settings(tmp_path, max_delay_ms=0.0), model=tiny_vit(seed=2)) as srv:
        secret = srv.create_key("slow")
        calls = {"commits": 0}

        @event.listens_for(srv.server.sessions, "do_orm_execute")
        def _mark(state) -> None:  # type: ignore[no-untyped-def]
            if state.is_insert and state.statement.table.name == UsageRecord.__tablename__:  # a billing transaction
                state.session.info["bills"] = True

        @event.listens_for(srv.server.sessions, "before_commit")
        def _slow(session) -> None:  # type: ignore[no-untyped-def]
            if session.info.pop("bills", False):
                calls["commits"] += 1
                time.sleep(COMMIT_S)

        channel, teacher = stub(srv.address)
        db = srv.settings.db.removeprefix("sqlite:///")
        seen: list[tuple[str, int]] = []
        lock = threading.Lock()

        def call(i: int) -> None:
            rid = f"c{i}"
            teacher.Infer(
                image_request(random_images(1, i), random_keep(1, 8 + i, i), request_id=rid), metadata=auth(secret)
            )
            with sqlite3.connect(db) as conn:  # the moment the answer is here, its row must be committed
                count = conn.execute("SELECT COUNT(*) FROM usage WHERE request_id = ?", (rid,)).fetchone()[0]
            with lock:
                seen.append((rid, count))

        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(call, range(8)))
        elapsed = time.monotonic() - started
        assert sorted(seen) == [(f"c{i}", 1) for i in range(8)]
        assert calls["commits"] >= 2 and elapsed >= calls["commits"] * COMMIT_S * 0.9
        event.remove(srv.server.sessions, "before_commit", _slow)
        event.remove(srv.server.sessions, "do_orm_execute", _mark)
        channel.close()
