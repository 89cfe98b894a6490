"""Metering and billing over real gRPC with a real SQLite ledger: totals under concurrency, exactly-once replay
(retry, concurrent duplicate, restart), quotas without overshoot, per-key prices."""

from __future__ import annotations

import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import service_testkit as kit
import torch
from service_testkit import auth, image_request, ledger_rows, random_images, random_keep, settings, stub

from maskedkd.v1 import teacher_pb2 as pb
from teacher_server.ledger import billing, database, keys, reports
from teacher_server.testing.server import running_server

pytestmark = [pytest.mark.dtype("float32"), pytest.mark.timeout(120)]

model = kit.model_fixture(seed=1)


def test_ledger_totals_equal_the_sum_of_responses_under_concurrent_clients_and_streams(tmp_path, model) -> None:
    cfg = settings(tmp_path, max_delay_ms=20.0, price_per_gflop=0.003)
    with running_server(cfg, model=model) as srv:
        keys = {name: srv.create_key(name) for name in ("k0", "k1", "k2")}
        channel, teacher = stub(srv.address)
        responses = kit.concurrent_clients(teacher, keys, unary=(8, 5), streams=(2, 8))
        rows = ledger_rows(srv.settings.db)
        assert len(rows) == len(responses) == 8 * 5 + 2 * 8
        kit.assert_rows_are_the_responses(rows, responses)
        for _, resp in responses:
            assert resp.usage.cost == pytest.approx(resp.usage.gflops * 0.003, rel=1e-12)
        assert max(r["batch_images"] for r in rows) > 3  # requests of different clients shared micro-batches
        with srv.server.sessions() as session:
            totals = {t.name: t for t in reports.usage_totals(session)}
        kit.assert_totals_add_up(totals, rows, responses, keys)
        channel.close()


def test_retry_replays_and_restart_keeps_exactly_once(tmp_path, model) -> None:
    cfg = settings(tmp_path)
    images, keep = random_images(2, 3), random_keep(2, 12, 3)
    with running_server(cfg, model=model) as srv:
        key = srv.create_key("carol")
        channel, teacher = stub(srv.address)
        first = kit.assert_retry_replays(teacher, images, keep, key)
        channel.close()
    assert len(ledger_rows(cfg.db)) == 1

    with running_server(cfg, model=model) as srv:  # a new process would see the same: a fresh server, same file
        channel, teacher = stub(srv.address)
        after = teacher.Infer(image_request(images, keep, request_id="job-1"), metadata=auth(key))
        assert after.usage.replayed and after.logits.data == first.logits.data
        fresh = teacher.Infer(image_request(images, keep, request_id="job-2"), metadata=auth(key))
        assert not fresh.usage.replayed
        torch.testing.assert_close(kit.logits_of(fresh), kit.logits_of(first), rtol=0, atol=1e-6)
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
        key, images, keep, cost, codes = kit.quota_race(srv, teacher, quota=3.5, calls=6)
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
        return kit.billable(key.id, rid, gflops, digest="d" * 64, payload=(b"\0" * 8, "1,2"))

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
