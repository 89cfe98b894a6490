"""Idempotency bound to content over real gRPC and a real SQLite ledger: a request_id replays only the inputs it
was billed for (ALREADY_EXISTS otherwise, also in flight), and an id whose replay payload expired is refused with
FAILED_PRECONDITION, never billed twice. The ledger is read back with SQL."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import service_testkit as kit
import torch
from dtype_marks import child_env
from service_testkit import auth, image_request, random_images, random_keep, settings, stub

from maskedkd.v1 import teacher_pb2 as pb
from teacher_server.service.accounting.content_digest import content_digest
from teacher_server.testing.server import running_server

pytestmark = [pytest.mark.dtype("float32"), pytest.mark.timeout(180)]


model = kit.model_fixture(seed=7)


def sql(db_url: str, query: str, params: tuple = ()) -> list[tuple]:
    with sqlite3.connect(db_url.removeprefix("sqlite:///")) as conn:
        return conn.execute(query, params).fetchall()


def refusal(teacher, request: pb.InferRequest, secret: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        teacher.Infer(request, metadata=auth(secret))
    return err.value


def test_same_id_same_content_replays_and_other_content_is_refused_unbilled(tmp_path, model) -> None:
    with running_server(settings(tmp_path), model=model) as srv:
        secret = srv.create_key("ivy")
        channel, teacher = stub(srv.address)
        images, keep = random_images(3, 1), random_keep(3, 20, 1)
        original = image_request(images, keep, request_id="step-1")
        first = teacher.Infer(original, metadata=auth(secret))
        again = teacher.Infer(original, metadata=auth(secret))
        assert not first.usage.replayed and again.usage.replayed
        assert again.logits.data == first.logits.data and again.usage.gflops == first.usage.gflops
        db = srv.settings.db
        stored = sql(db, "SELECT request_id, images, gflops, content_digest FROM usage")
        assert stored == [("step-1", 3, first.usage.gflops, content_digest(original, model=srv.model_name).value)]

        other_batch = image_request(images[:1], keep[:1], request_id="step-1")  # 1 image, not 3
        other_bytes = image_request(images.flip(0), keep, request_id="step-1")  # same shape, other pixels
        other_keep = image_request(images, random_keep(3, 20, 2), request_id="step-1")  # other kept patches
        other_counts = image_request(images, keep, request_id="step-1", counts=torch.tensor([20, 10, 5]))
        # same pixels, other kind
        as_patches = kit.patch_request(kit.patches_of(images, keep), keep, request_id="step-1")
        for request in (other_batch, other_bytes, other_keep, other_counts, as_patches):
            err = refusal(teacher, request, secret)
            assert err.code() == grpc.StatusCode.ALREADY_EXISTS
            assert err.details() == "request_id 'step-1' was already used with different inputs; nothing billed"
        assert sql(db, "SELECT COUNT(*), SUM(gflops) FROM usage") == [(1, first.usage.gflops)]
        assert sql(
            db,
            "SELECT requests, gflops FROM key_counters k JOIN api_keys a ON a.id = k.api_key_id WHERE a.name = 'ivy'",
        ) == [(1, first.usage.gflops)]
        assert teacher.Infer(original, metadata=auth(secret)).usage.replayed  # the original still replays
        other_key = srv.create_key("jo")  # ids are per key: another key's "step-1" is its own request
        assert not teacher.Infer(other_batch, metadata=auth(other_key)).usage.replayed
        channel.close()


def test_accept_billed_answer_replays_what_was_billed_for_a_batch_of_the_same_size(tmp_path, model) -> None:
    """A resumed run's re-send with other kept patches takes the billed answer (unbilled); another batch size, an
    unbilled id, or no flag behave as before."""
    with running_server(settings(tmp_path), model=model) as srv:
        secret = srv.create_key("ada")
        channel, teacher = stub(srv.address)
        images = random_images(3, 1)
        first = teacher.Infer(image_request(images, random_keep(3, 20, 1), request_id="s-1"), metadata=auth(secret))
        resent = image_request(images, random_keep(3, 20, 2), request_id="s-1")  # other patches, same images
        assert refusal(teacher, resent, secret).code() == grpc.StatusCode.ALREADY_EXISTS  # without the flag
        resent.accept_billed_answer = True
        again = teacher.Infer(resent, metadata=auth(secret))
        assert again.usage.replayed and again.logits.data == first.logits.data
        assert (again.usage.gflops, again.usage.cost) == (first.usage.gflops, first.usage.cost)
        other_size = image_request(images[:2], random_keep(2, 20, 2), request_id="s-1")
        other_size.accept_billed_answer = True
        assert refusal(teacher, other_size, secret).code() == grpc.StatusCode.ALREADY_EXISTS
        new = image_request(images, random_keep(3, 20, 3), request_id="s-2")
        new.accept_billed_answer = True  # never billed: served and billed as usual
        assert not teacher.Infer(new, metadata=auth(secret)).usage.replayed
        channel.close()
        assert sql(srv.settings.db, "SELECT request_id, gflops FROM usage ORDER BY id") == [
            ("s-1", first.usage.gflops),
            ("s-2", first.usage.gflops),
        ]


def test_a_retry_under_another_purpose_replays_what_was_billed_under_the_first(tmp_path, model) -> None:
    # purpose is not part of the digest (it does not change the answer): the retry is a replay, not ALREADY_EXISTS,
    # and the row keeps the purpose it was billed with, so reports stay as billed
    with running_server(settings(tmp_path), model=model) as srv:
        secret = srv.create_key("kim")
        channel, teacher = stub(srv.address)
        probe = image_request(random_images(2, 5), random_keep(2, 12, 5), request_id="s0-probe-full")
        probe.purpose = "probe"
        first = teacher.Infer(probe, metadata=auth(secret))
        unlabelled = pb.InferRequest()
        unlabelled.CopyFrom(probe)
        unlabelled.purpose = ""
        again = teacher.Infer(unlabelled, metadata=auth(secret))
        channel.close()
        assert not first.usage.replayed and again.usage.replayed
        assert again.logits.data == first.logits.data
        assert (again.usage.gflops, again.usage.cost) == (first.usage.gflops, first.usage.cost)
        assert (
            content_digest(probe, model=srv.model_name).value == content_digest(unlabelled, model=srv.model_name).value
        )
        assert sql(srv.settings.db, "SELECT request_id, purpose, gflops, cost FROM usage") == [
            ("s0-probe-full", "probe", first.usage.gflops, first.usage.cost)
        ]


def test_concurrent_duplicates_with_different_content_bill_one_and_refuse_the_others(tmp_path, model) -> None:
    with running_server(settings(tmp_path, max_delay_ms=100.0), model=model) as srv:
        secret = srv.create_key("kim")
        channel, teacher = stub(srv.address)
        requests = [
            image_request(random_images(1 + i % 2, 10 + i), random_keep(1 + i % 2, 12, i), request_id="dup")
            for i in range(4)
        ] * 3  # 4 different contents, each sent 3 times, all at once

        def call(request: pb.InferRequest) -> tuple[grpc.StatusCode, pb.InferResponse | None]:
            try:
                return grpc.StatusCode.OK, teacher.Infer(request, metadata=auth(secret))
            except grpc.RpcError as err:
                return err.code(), None

        with ThreadPoolExecutor(max_workers=12) as pool:
            results = list(pool.map(call, requests))
        ((digest, images, gflops),) = sql(srv.settings.db, "SELECT content_digest, images, gflops FROM usage")
        winner = [r for r in requests if content_digest(r, model=srv.model_name).value == digest]
        assert len(winner) == 3  # the billed row is one of the contents sent
        for request, (code, response) in zip(requests, results, strict=True):
            if request in winner:
                assert code == grpc.StatusCode.OK and response is not None
                assert response.usage.gflops == gflops and response.usage.images == images
            else:
                assert code == grpc.StatusCode.ALREADY_EXISTS
        ok = [resp for code, resp in results if code == grpc.StatusCode.OK]
        assert sum(not r.usage.replayed for r in ok) == 1 and len({r.logits.data for r in ok}) == 1
        channel.close()


def test_an_id_whose_replay_payload_expired_is_refused_and_never_billed_twice(tmp_path, model) -> None:
    with running_server(settings(tmp_path, replay_ttl="1s"), model=model) as srv:
        secret = srv.create_key("lee")
        channel, teacher = stub(srv.address)
        request = image_request(random_images(2, 3), random_keep(2, 16, 3), request_id="old")
        first = teacher.Infer(request, metadata=auth(secret))
        db = srv.settings.db
        assert sql(db, "SELECT COUNT(*), MIN(length(logits)) FROM replay_payloads") == [(1, 2 * 10 * 4)]
        assert sql(db, "SELECT logits_shape FROM replay_payloads") == [("2,10",)]
        time.sleep(1.2)
        err = refusal(teacher, request, secret)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "no longer kept" in err.details()
        env = child_env()
        purged = subprocess.run(
            [sys.executable, "-m", "teacher_server.cli", "ledger", "purge", "--db", db],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert purged.returncode == 0 and purged.stdout.startswith("purged 1 replay payloads"), purged.stderr
        assert sql(db, "SELECT COUNT(*) FROM replay_payloads") == [(0,)]
        assert refusal(teacher, request, secret).code() == grpc.StatusCode.FAILED_PRECONDITION
        assert sql(db, "SELECT request_id, gflops FROM usage") == [("old", first.usage.gflops)]  # kept, billed once
        channel.close()


def test_ledger_purge_older_than_keeps_billing_rows(tmp_path, model) -> None:
    with running_server(settings(tmp_path), model=model) as srv:
        secret = srv.create_key("max")
        channel, teacher = stub(srv.address)
        for i in range(3):
            teacher.Infer(image_request(random_images(1, i), request_id=f"r{i}"), metadata=auth(secret))
        channel.close()
    db = srv.settings.db
    env = child_env()
    cli = [sys.executable, "-m", "teacher_server.cli", "ledger", "purge", "--db", db]
    kept = subprocess.run([*cli, "--older-than", "1h"], capture_output=True, text=True, timeout=60, env=env)
    assert kept.returncode == 0 and kept.stdout.startswith("purged 0 replay payloads")
    time.sleep(1.1)
    gone = subprocess.run([*cli, "--older-than", "1s"], capture_output=True, text=True, timeout=60, env=env)
    assert gone.returncode == 0 and gone.stdout.startswith("purged 3 replay payloads")
    bad = subprocess.run([*cli, "--older-than", "soon"], capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "not a duration" in bad.stderr
    assert sql(db, "SELECT COUNT(*) FROM usage") == [(3,)]


def test_the_server_purges_expired_replay_payloads_by_itself(tmp_path, model) -> None:
    with running_server(settings(tmp_path, replay_ttl="1s", replay_purge_interval_s=0.3), model=model) as srv:
        secret = srv.create_key("nia")
        channel, teacher = stub(srv.address)
        teacher.Infer(image_request(random_images(1, 5), request_id="soon-gone"), metadata=auth(secret))
        channel.close()
        db = srv.settings.db
        assert sql(db, "SELECT COUNT(*) FROM replay_payloads") == [(1,)]
        deadline = time.monotonic() + 10
        while sql(db, "SELECT COUNT(*) FROM replay_payloads") != [(0,)] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sql(db, "SELECT COUNT(*) FROM replay_payloads") == [(0,)]
        assert sql(db, "SELECT request_id FROM usage") == [("soon-gone",)]  # the billing row stays


def test_a_row_billed_with_the_sha256_digest_before_revision_0005_still_replays(tmp_path, model) -> None:
    """Rows billed before BLAKE3 digests hold a bare sha256 hex: a retry of such a row (after an upgrade, on a
    restarted server) is replayed, not refused or billed again; other content under its id is still refused."""
    from teacher_server.service.accounting.content_digest import sha256_digest

    images, keep = random_images(2, 5), random_keep(2, 16, 5)
    original = image_request(images, keep, request_id="old-step")
    with running_server(settings(tmp_path), model=model) as srv:
        secret = srv.create_key("legacy")
        first = stub(srv.address)[1].Infer(original, metadata=auth(secret))
        db, name = srv.settings.db, srv.model_name
    legacy = sha256_digest(original, model=name)
    assert len(legacy) == 64 and not legacy.startswith("blake3:")
    with sqlite3.connect(db.removeprefix("sqlite:///")) as conn:
        conn.execute("UPDATE usage SET content_digest = ? WHERE request_id = 'old-step'", (legacy,))
    with running_server(settings(tmp_path), model=model) as srv:
        _, teacher = stub(srv.address)
        again = teacher.Infer(original, metadata=auth(secret))
        assert again.usage.replayed and again.logits.data == first.logits.data
        other = refusal(teacher, image_request(images.flip(0), keep, request_id="old-step"), secret)
        assert other.code() == grpc.StatusCode.ALREADY_EXISTS
    assert sql(db, "SELECT request_id, content_digest FROM usage") == [("old-step", legacy)]  # billed once
