"""Metering and billing over real gRPC with a real SQLite ledger: totals under concurrency, exactly-once replay
(retry, concurrent duplicate, restart), quotas without overshoot, per-key prices."""

from __future__ import annotations

import math
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from service_testkit import (
    auth,
    image_request,
    ledger_rows,
    logits_of,
    random_images,
    random_keep,
    settings,
    stub,
    tiny_vit,
)

from maskedkd.v1 import teacher_pb2 as pb
from teacher_server.ledger import billing, database, keys, models, reports
from teacher_server.testing.server import running_server

pytestmark = [pytest.mark.dtype("float32"), pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_vit(seed=1)


def test_ledger_totals_equal_the_sum_of_responses_under_concurrent_clients_and_streams(tmp_path, model) -> None:
    cfg = settings(tmp_path, max_delay_ms=20.0, price_per_gflop=0.003)
    with running_server(cfg, model=model) as srv:
        keys = {name: srv.create_key(name) for name in ("k0", "k1", "k2")}
        channel, teacher = stub(srv.address)
        responses: list[tuple[str, pb.InferResponse]] = []
        lock = threading.Lock()

        def unary_client(c: int) -> None:
            name = f"k{c % 3}"
            for i in range(5):
                k = 4 + (7 * c + 3 * i) % 60
                req = image_request(
                    random_images(1 + (c + i) % 3, c * 10 + i),
                    random_keep(1 + (c + i) % 3, k, i),
                    request_id=f"u{c}-{i}" if i % 2 == 0 else "",
                )  # also server-assigned ids
                resp = teacher.Infer(req, metadata=auth(keys[name]))
                with lock:
                    responses.append((name, resp))

        def stream_client(c: int) -> None:
            name = f"k{c % 3}"
            reqs = [
                image_request(random_images(2, 500 + c * 10 + i), random_keep(2, 5 + i * 6, i), request_id=f"s{c}-{i}")
                for i in range(8)
            ]
            got = list(teacher.InferStream(iter(reqs), metadata=auth(keys[name])))
            assert sorted(r.request_id for r in got) == sorted(r.request_id for r in reqs)
            with lock:
                responses.extend((name, r) for r in got)

        with ThreadPoolExecutor(max_workers=10) as pool:
            futures = [pool.submit(unary_client, c) for c in range(8)] + [
                pool.submit(stream_client, c) for c in range(2)
            ]
            for f in futures:
                f.result()
        rows = ledger_rows(srv.settings.db)
        assert len(rows) == len(responses) == 8 * 5 + 2 * 8
        assert len({r["request_id"] for r in rows}) == len(rows)
        by_id = {r["request_id"]: r for r in rows}
        for name, resp in responses:  # every response is exactly its row
            row = by_id[resp.request_id]
            assert row["key"] == name and not resp.usage.replayed
            assert (row["images"], row["tokens"], row["gflops"], row["full_gflops"], row["cost"]) == (
                resp.usage.images,
                resp.usage.tokens,
                resp.usage.gflops,
                resp.usage.full_gflops,
                resp.usage.cost,
            )
            assert resp.usage.cost == pytest.approx(resp.usage.gflops * 0.003, rel=1e-12)
        assert max(r["batch_images"] for r in rows) > 3  # requests of different clients shared micro-batches
        with srv.server.sessions() as session:
            totals = {t.name: t for t in reports.usage_totals(session)}
        for name in keys:
            mine = [resp.usage for n, resp in responses if n == name]
            t = totals[name]
            assert (t.requests, t.images, t.tokens) == (
                len(mine),
                sum(u.images for u in mine),
                sum(u.tokens for u in mine),
            )
            for field in ("gflops", "full_gflops", "cost"):
                exact = math.fsum(getattr(u, field) for u in mine)
                assert math.fsum(r[field] for r in rows if r["key"] == name) == exact  # row by row, exactly
                assert getattr(t, field) == pytest.approx(exact, rel=1e-12)  # SQL SUM, any order
        channel.close()


def test_retry_replays_and_restart_keeps_exactly_once(tmp_path, model) -> None:
    cfg = settings(tmp_path)
    images, keep = random_images(2, 3), random_keep(2, 12, 3)
    with running_server(cfg, model=model) as srv:
        key = srv.create_key("carol")
        channel, teacher = stub(srv.address)
        first = teacher.Infer(image_request(images, keep, request_id="job-1"), metadata=auth(key))
        retry = teacher.Infer(image_request(images, keep, request_id="job-1"), metadata=auth(key))
        assert not first.usage.replayed and retry.usage.replayed
        assert retry.logits.data == first.logits.data  # the stored logits, bit for bit
        assert (retry.usage.gflops, retry.usage.cost, retry.usage.tokens) == (
            first.usage.gflops,
            first.usage.cost,
            first.usage.tokens,
        )
        channel.close()
    assert len(ledger_rows(cfg.db)) == 1

    with running_server(cfg, model=model) as srv:  # a new process would see the same: a fresh server, same file
        channel, teacher = stub(srv.address)
        after = teacher.Infer(image_request(images, keep, request_id="job-1"), metadata=auth(key))
        assert after.usage.replayed and after.logits.data == first.logits.data
        fresh = teacher.Infer(image_request(images, keep, request_id="job-2"), metadata=auth(key))
        assert not fresh.usage.replayed
        torch.testing.assert_close(logits_of(fresh), logits_of(first), rtol=0, atol=1e-6)
        channel.close()
    rows = ledger_rows(cfg.db)
    assert [r["request_id"] for r in rows] == ["job-1", "job-2"]


def test_a_concurrent_duplicate_in_flight_is_billed_once(tmp_path, model) -> None:
    with running_server(settings(tmp_path, max_delay_ms=300.0), model=model) as srv:
        key = srv.create_key("dave")
        channel, teacher = stub(srv.address)
        request = image_request(random_images(2, 9), random_keep(2, 30, 9), request_id="dup")
        barrier = threading.Barrier(6)

        def call() -> pb.InferResponse:
            barrier.wait()
            return teacher.Infer(request, metadata=auth(key))

        with ThreadPoolExecutor(max_workers=6) as pool:
            answers = [f.result() for f in [pool.submit(call) for _ in range(6)]]
        assert sum(not a.usage.replayed for a in answers) == 1
        assert len({a.logits.data for a in answers}) == 1
        assert len(ledger_rows(srv.settings.db)) == 1
        channel.close()


def test_quota_refuses_without_billing_and_never_overshoots(tmp_path, model) -> None:
    with running_server(settings(tmp_path, max_delay_ms=200.0), model=model) as srv:
        channel, teacher = stub(srv.address)
        images, keep = random_images(1, 4), random_keep(1, 16, 4)
        cost = teacher.Infer(image_request(images, keep), metadata=auth(srv.create_key("probe"))).usage.gflops
        key = srv.create_key("erin", quota_gflops=3.5 * cost)

        def call(i: int) -> grpc.StatusCode:
            try:
                teacher.Infer(image_request(images, keep, request_id=f"q{i}"), metadata=auth(key))
                return grpc.StatusCode.OK
            except grpc.RpcError as err:
                assert "quota" in err.details() and "erin" in err.details()
                return err.code()

        with ThreadPoolExecutor(max_workers=6) as pool:  # all at once, in one micro-batch
            codes = list(pool.map(call, range(6)))
        assert codes.count(grpc.StatusCode.OK) == 3
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 3
        rows = [r for r in ledger_rows(srv.settings.db) if r["key"] == "erin"]
        assert len(rows) == 3 and sum(r["gflops"] for r in rows) <= 3.5 * cost
        ok_id = next(f"q{i}" for i, c in enumerate(codes) if c == grpc.StatusCode.OK)
        replay = teacher.Infer(image_request(images, keep, request_id=ok_id), metadata=auth(key))
        assert replay.usage.replayed  # a replay is not new usage, so the quota does not block it
        with pytest.raises(grpc.RpcError) as err:
            teacher.Infer(image_request(images, keep, request_id="late"), metadata=auth(key))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len([r for r in ledger_rows(srv.settings.db) if r["key"] == "erin"]) == 3
        channel.close()


def test_a_key_price_overrides_the_server_default(tmp_path, model) -> None:
    with running_server(settings(tmp_path, price_per_gflop=0.01), model=model) as srv:
        channel, teacher = stub(srv.address)
        request = image_request(random_images(2, 2), random_keep(2, 20, 2))
        default = teacher.Infer(request, metadata=auth(srv.create_key("std"))).usage
        special = srv.create_key("vip", price_per_gflop=0.25)
        own = teacher.Infer(request, metadata=auth(special)).usage
        assert default.cost == pytest.approx(default.gflops * 0.01, rel=1e-12)
        assert own.cost == pytest.approx(own.gflops * 0.25, rel=1e-12) and own.gflops == default.gflops
        info = teacher.GetModelInfo(pb.ModelInfoRequest(), metadata=auth(special))
        assert info.price_per_gflop == 0.25
        assert {r["key"]: r["cost"] for r in ledger_rows(srv.settings.db)} == {"std": default.cost, "vip": own.cost}
        channel.close()


def test_ledger_insert_settles_a_duplicate_written_elsewhere(tmp_path) -> None:
    """Two servers on one database: the unique (key, request_id) lets only one row in; the other gets it back, and
    the running totals count the stored rows only."""
    sessions = database.open_ledger(f"sqlite:///{tmp_path / 'l.db'}")
    with sessions() as s:
        key = keys.add_api_key(s, name="k", key_prefix="mkd_x", key_hash="h" * 64)

    def item(rid: str, gflops: float) -> billing.Billable:
        row = models.NewUsage(
            api_key_id=key.id,
            request_id=rid,
            model="m",
            images=1,
            tokens=2,
            gflops=gflops,
            full_gflops=2.0,
            cost=gflops,
            latency_ms=1.0,
            queue_ms=0.5,
            batch_images=1,
            content_digest="d" * 64,
        )
        return billing.Billable(row, "lifetime", payload=(b"\0" * 8, "1,2"))

    with sessions() as s:
        assert billing.bill(s, items=[item("a", 1.0)], replay_ttl_s=60) == [None]
    with sessions() as s:
        outcome = billing.bill(s, items=[item("b", 1.5), item("a", 9.0), item("c", 0.5)], replay_ttl_s=60)
    assert outcome[0] is None and outcome[2] is None
    assert outcome[1] is not None and outcome[1].gflops == 1.0  # the stored one, not the new numbers
    with sessions() as s:
        assert reports.used_gflops(s, api_key_id=key.id) == 3.0
    with sqlite3.connect(tmp_path / "l.db") as conn:
        assert conn.execute("SELECT requests, gflops, window_gflops FROM key_counters").fetchall() == [(3, 3.0, 3.0)]
        assert conn.execute("SELECT COUNT(*) FROM replay_payloads").fetchone() == (3,)
