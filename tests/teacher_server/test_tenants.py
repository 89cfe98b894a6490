"""Many keys on one teacher, through real gRPC (a server on 127.0.0.1, its SQLite ledger read back with SQL): a full
key queue is refused before its request is read and unbilled, with a RetryInfo; another key is not held back by it;
a request whose deadline passes in the queue is dropped unrun and unbilled; one whose forward started is billed and
its answer replayed to the retry (without a request_id no retry can have it: not billed). The forward is held on a
gate so the queue states are exact, not raced.

The last test runs two replicas on one Postgres ledger. Checks float32 logits on the CPU (pinned: the gate needs an
eager forward)."""

from __future__ import annotations

import sqlite3
import threading
import time
from typing import Any

import grpc
import pytest
import service_testkit as kit
import torch
from postgres_testkit import pg_rows, postgres_server, postgres_url  # noqa: F401 (fixtures)
from torch import nn

from maskedkd.v1 import teacher_pb2 as pb
from student_client.transport.retry import retry_after_s
from teacher_server.settings import ServerSettings
from teacher_server.testing.server import running_server

pytestmark = [pytest.mark.dtype("float32"), pytest.mark.timeout(180)]


class Gate:
    """Holds the teacher mid-forward: the first block's MLP waits for `opened` (and says it `entered`)."""

    def __init__(self, model: nn.Module) -> None:
        self.opened = threading.Event()
        self.entered = threading.Event()
        mlp = model.blocks[0].mlp
        run = mlp.forward

        def gated(x: torch.Tensor) -> torch.Tensor:
            self.entered.set()
            assert self.opened.wait(timeout=60), "the test never opened the gate"
            return run(x)

        mlp.forward = gated  # the instance's forward: the model's classes stay timm's


def gated_vit() -> tuple[nn.Module, Gate]:
    model = kit.tiny_vit(seed=11)
    return model, Gate(model)


def wait_until(condition: Any, timeout_s: float = 20.0) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.01)


def billed_ids(srv: Any) -> set[str]:
    return {r["request_id"] for r in kit.ledger_rows(srv.settings.db)}


def sql(db_url: str, query: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db_url.removeprefix("sqlite:///")) as conn:
        return conn.execute(query).fetchall()


def test_a_full_key_queue_is_refused_unread_and_unbilled_and_other_keys_go_on(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, gated = gated_vit()
    settings = kit.settings(tmp_path, dtype="float32", max_queued_images_per_key=4, max_batch_images=2)
    with running_server(settings, model=model) as srv:
        greedy, light = srv.create_key("greedy"), srv.create_key("light")
        _, teacher = kit.stub(srv.address)
        queue = srv.server.served.batcher.queue
        images, keep = kit.random_images(2, seed=1), kit.random_keep(2, 20, seed=2)

        def send(rid: str, key: str, timeout: float = 60) -> Any:
            request = kit.image_request(images, keep, request_id=rid)
            return teacher.Infer.future(request, metadata=kit.auth(key), timeout=timeout)

        running = send("g0", greedy)  # in the forward, held at the gate
        assert gated.entered.wait(20)
        batcher = srv.server.served.batcher
        formed = batcher.batches_started
        # g1 is staged as the next batch (the pipeline holds one batch ahead of the forward), out of the queue before
        # g2 comes (sent at once, all three could meet in the queue on a busy machine: 6 images, g3 refused); g2 and
        # g3 queue: 4 images, the key's bound.
        queued = [send("g1", greedy)]
        wait_until(lambda: batcher.batches_started == formed + 1)
        queued += [send("g2", greedy), send("g3", greedy)]
        wait_until(lambda: queue.images == 4)
        with pytest.raises(grpc.RpcError) as refused:
            send("g4", greedy).result(timeout=10)  # answered while the teacher is still held: refused unread
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "images queued (at most 4)" in refused.value.details()
        assert (retry_after_s(refused.value) or 0) > 0  # a RetryInfo the client library waits on

        light_ok = send("l0", light)  # another key's queue has room
        wait_until(lambda: queue.images == 6)
        gated.opened.set()
        for call in [running, *queued, light_ok]:
            assert call.result(timeout=60).usage.images == 2
    assert billed_ids(srv) == {"g0", "g1", "g2", "g3", "l0"}  # the refused g4 is not in the ledger
    refusals = sql(
        settings.db, "SELECT k.name, r.reason, r.count FROM refusals r JOIN api_keys k ON k.id = r.api_key_id"
    )
    assert refusals == [("greedy", "overload", 1)]


def test_a_deadline_passing_in_the_queue_is_not_billed_and_a_started_forward_is_billed_and_replayed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, gated = gated_vit()
    settings = kit.settings(tmp_path, dtype="float32", max_batch_images=2)
    with running_server(settings, model=model) as srv:
        key = srv.create_key("tenant")
        _, teacher = kit.stub(srv.address)
        queue = srv.server.served.batcher.queue
        images, keep = kit.random_images(2, seed=3), kit.random_keep(2, 20, seed=4)
        started = teacher.Infer.future(
            kit.image_request(images, keep, request_id="started"), metadata=kit.auth(key), timeout=1.0
        )
        assert gated.entered.wait(20)  # its forward started: from here it is billed, whatever the caller does
        late = teacher.Infer.future(
            kit.image_request(images, keep, request_id="late"), metadata=kit.auth(key), timeout=1.0
        )
        time.sleep(0.3)  # "late" is staged behind the held batch or queued: either way it waits
        for call in (started, late):
            with pytest.raises(grpc.RpcError) as gave_up:
                call.result(timeout=10)
            assert gave_up.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        gated.opened.set()
        wait_until(lambda: "started" in billed_ids(srv) and queue.images == 0)
        retry = teacher.Infer(kit.image_request(images, keep, request_id="started"), metadata=kit.auth(key), timeout=60)
        assert retry.usage.replayed  # the answer paid for is not lost: the retry gets it, billed once
        _, call = teacher.GetModelInfo.with_call(pb.ModelInfoRequest(), metadata=kit.auth(key), timeout=10)
        assert float(dict(call.initial_metadata())["x-queue-wait-s"]) >= 0  # the key's wait estimate, in seconds
        torch.testing.assert_close(kit.logits_of(retry), kit.Reference(model).logits(images, keep), **kit.CLOSE)
    assert billed_ids(srv) == {"started"}  # "late" waited in the queue past its deadline: dropped unrun, unbilled


def test_a_started_forward_whose_caller_left_without_a_request_id_is_run_but_not_billed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Without a request_id no retry can be given an answer, so a caller that leaves while its forward runs could
    never receive what it would be billed for: nothing is billed, the images are counted as run unbilled."""
    model, gated = gated_vit()
    settings = kit.settings(tmp_path, dtype="float32", max_batch_images=2)
    with running_server(settings, model=model) as srv:
        key = srv.create_key("tenant")
        _, teacher = kit.stub(srv.address)
        images, keep = kit.random_images(2, seed=3), kit.random_keep(2, 20, seed=4)
        left = teacher.Infer.future(kit.image_request(images, keep), metadata=kit.auth(key), timeout=1.0)
        assert gated.entered.wait(20)  # its forward started
        with pytest.raises(grpc.RpcError) as gave_up:
            left.result(timeout=10)
        assert gave_up.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        gated.opened.set()
        wait_until(lambda: srv.server.served.batcher.idle)
        stayed = teacher.Infer(kit.image_request(images, keep), metadata=kit.auth(key), timeout=60)
        torch.testing.assert_close(kit.logits_of(stayed), kit.Reference(model).logits(images, keep), **kit.CLOSE)
        metrics = srv.server.metrics
        unbilled = metrics.registry.get_sample_value(
            "maskedkd_unbilled_images_total", {"key": metrics.key_label("tenant")}
        )
    assert [r["request_id"] for r in kit.ledger_rows(settings.db)] == [stayed.request_id]  # only the answer received
    assert unbilled == 2


def test_two_replicas_on_postgres_shed_and_late_requests_unbilled_and_a_started_one_replayed_by_the_other(
    postgres_url: str,
) -> None:
    """Two servers sharing one Postgres ledger, each with its own queue: a full queue on one is refused unbilled, a
    request late in the other's queue is dropped unbilled, and the answer of a forward that started on one (its
    caller gone) is replayed by the other to the retry, billed once. Rows and refusals read back with psycopg2."""
    first_model, first_gate = gated_vit()
    second_model, second_gate = gated_vit()
    base = {"model": kit.MODEL, "model_kwargs": kit.TINY, "db": postgres_url, "metrics_port": None}
    limits = {"dtype": "float32", "max_batch_images": 2, "max_queued_images_per_key": 2, "max_delay_ms": 2.0}
    images, keep = kit.random_images(2, seed=5), kit.random_keep(2, 20, seed=6)
    with (
        running_server(ServerSettings(**base, **limits), model=first_model) as one,
        running_server(ServerSettings(**base, **limits), model=second_model) as two,
    ):
        key = one.create_key("tenant")
        _, first = kit.stub(one.address)
        _, second = kit.stub(two.address)

        def send(teacher: Any, rid: str, timeout: float = 60) -> Any:
            request = kit.image_request(images, keep, request_id=rid)
            return teacher.Infer.future(request, metadata=kit.auth(key), timeout=timeout)

        held = [send(first, "a0")]
        assert first_gate.entered.wait(20)
        batcher = one.server.served.batcher
        formed = batcher.batches_started
        held.append(send(first, "a1"))  # staged behind the held forward: out of the queue before a2 comes
        wait_until(lambda: batcher.batches_started == formed + 1)
        held.append(send(first, "a2"))  # queued: the key's queue (2 images) is full
        wait_until(lambda: batcher.queue.images == 2)
        with pytest.raises(grpc.RpcError) as refused:
            send(first, "a3").result(timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        started = send(second, "b0", timeout=1.0)
        assert second_gate.entered.wait(20)
        late = send(second, "b1", timeout=1.0)
        for call in (started, late):
            with pytest.raises(grpc.RpcError) as gave_up:
                call.result(timeout=10)
            assert gave_up.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        first_gate.opened.set()
        second_gate.opened.set()
        assert [call.result(timeout=60).usage.images for call in held] == [2, 2, 2]
        wait_until(lambda: ("b0",) in pg_rows(postgres_url, "SELECT request_id FROM usage"))
        retry = first.Infer(kit.image_request(images, keep, request_id="b0"), metadata=kit.auth(key), timeout=60)
        assert retry.usage.replayed  # billed by the second replica, answered again by the first
    billed = sorted(r[0] for r in pg_rows(postgres_url, "SELECT request_id FROM usage"))
    assert billed == ["a0", "a1", "a2", "b0"]  # a3 refused, b1 dropped late: neither billed
    refusals = pg_rows(postgres_url, "SELECT reason, SUM(count) FROM refusals GROUP BY reason")
    assert [(reason, int(n)) for reason, n in refusals] == [("overload", 1)]
