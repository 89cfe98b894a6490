"""InferStream answers per message over real gRPC: a failed message gets its own error answer keyed by its request_id
and the stream goes on; a stream that must end (server shutdown) ends only after every billed answer was sent. The
ledger is read back with SQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import service_testkit as kit
import torch
from service_testkit import auth, image_request, ledger_rows, random_images, random_keep

from maskedkd.codec import proto_to_tensor
from maskedkd.v1 import teacher_pb2 as pb
from teacher_server.testing.server import RunningServer, running_server

pytestmark = [pytest.mark.dtype("float32"), pytest.mark.timeout(120)]

STREAM = "/maskedkd.v1.TeacherService/InferStream"


def _raw_stream(channel: grpc.Channel) -> grpc.StreamStreamMultiCallable:
    """InferStream with identity serializers: bytes go out as given, answers come back as bytes."""
    return channel.stream_stream(STREAM)


def _good(i: int) -> tuple[pb.InferRequest, torch.Tensor, torch.Tensor]:
    images, keep = random_images(2, 100 + i), random_keep(2, 8 + 4 * i, 100 + i)
    if i % 2:
        return kit.patch_request(kit.patches_of(images, keep), keep, request_id=f"good-{i}"), images, keep
    return image_request(images, keep, request_id=f"good-{i}"), images, keep


def _bad_messages() -> list[tuple[bytes, str, grpc.StatusCode, str]]:
    """(bytes sent, request_id the answer must carry, code, words its message needs)."""
    images, keep = random_images(2, 7), random_keep(2, 8, 7)
    one_channel = image_request(images[:, :1].contiguous(), keep, request_id="one-channel")
    unknown_model = image_request(images, keep, request_id="no-such-model", model="resnet" * 1000)
    long_id = image_request(images, keep, request_id="L" * 300)
    cut = image_request(images, keep, request_id="cut-short").SerializeToString()[:-7]
    bad_dtype = image_request(images, keep, request_id="bad-dtype")
    bad_dtype.images.dtype = "uint9"
    bad_utf8_dtype = bad_dtype.SerializeToString().replace(b"uint9", b"uin\xff9")
    bad_utf8_id = image_request(images, keep, request_id="idXX").SerializeToString().replace(b"idXX", b"id\xc3\x28")
    bad_purpose = image_request(images, keep, request_id="bad-purpose")
    bad_purpose.purpose = "Training Targets"
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    return [
        (one_channel.SerializeToString(), "one-channel", invalid, "1 channels"),
        (unknown_model.SerializeToString(), "no-such-model", grpc.StatusCode.NOT_FOUND, "unknown model 'resnet"),
        (long_id.SerializeToString(), "L" * 300, invalid, "request_id is 300 characters"),
        (cut, "cut-short", invalid, "not a valid maskedkd.v1.InferRequest: keep_indices"),
        (bad_utf8_dtype, "bad-dtype", invalid, "images.dtype is not valid UTF-8"),
        (bad_utf8_id, "", invalid, "request_id is not valid UTF-8"),
        (bad_purpose.SerializeToString(), "bad-purpose", invalid, "purpose 'Training Targets' may hold only"),
    ]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    model = kit.tiny_vit(seed=4)
    with running_server(kit.settings(tmp_path_factory.mktemp("stream")), model=model) as srv:
        yield srv, kit.Reference(model)


def test_each_message_gets_its_own_answer_and_only_good_ones_are_billed(served) -> None:
    srv, reference = served
    key = srv.create_key("mixed")
    goods = [_good(i) for i in range(6)]
    for request, _, _ in goods[4:]:
        request.purpose = "probe"  # per message: the others stay training targets
    bads = _bad_messages()
    messages = (
        [g[0].SerializeToString() for g in goods[:3]]
        + [b[0] for b in bads[:3]]
        + [g[0].SerializeToString() for g in goods[3:]]
        + [b[0] for b in bads[3:]]
    )
    with grpc.insecure_channel(srv.address) as channel:
        answers = [
            pb.InferResponse.FromString(r) for r in _raw_stream(channel)(iter(messages), metadata=auth(key), timeout=60)
        ]
    assert len(answers) == len(messages)  # one answer per message; the stream ended OK after the last
    by_id = {a.request_id: a for a in answers}
    assert len(by_id) == len(answers)
    for request, images, keep in goods:
        answer = by_id[request.request_id]
        assert not answer.HasField("error")
        torch.testing.assert_close(proto_to_tensor(answer.logits), reference.logits(images, keep), **kit.CLOSE)
        assert answer.usage.images == 2 and not answer.usage.replayed
    for _, request_id, code, words in bads:
        answer = by_id[request_id]
        assert answer.HasField("error") and not answer.HasField("logits") and not answer.HasField("usage")
        assert answer.error.code == code.value[0], (request_id[:20], answer.error)
        assert words in answer.error.message and len(answer.error.message) <= 300, answer.error.message
    rows = [r for r in ledger_rows(srv.settings.db) if r["key"] == "mixed"]
    assert sorted(r["request_id"] for r in rows) == sorted(g[0].request_id for g in goods)  # each exactly once
    assert {r["request_id"]: r["purpose"] for r in rows} == {g[0].request_id: g[0].purpose for g in goods}
    assert sorted(r["purpose"] for r in rows) == [""] * 4 + ["probe"] * 2
    for row in rows:
        assert row["gflops"] == pytest.approx(by_id[row["request_id"]].usage.gflops, rel=1e-12)


def test_shutdown_ends_a_stream_only_after_every_billed_answer_was_sent(tmp_path: Path) -> None:
    # The client never half-closes: it keeps sending while the server shuts down. Before per-message answers the
    # server kept serving the stream for the grace period, then cut it with answers billed but unsent.
    srv = RunningServer(kit.settings(tmp_path, max_delay_ms=20.0, grace_s=5.0), model=kit.tiny_vit(seed=5))
    key = srv.create_key("shutdown")
    sent: list[str] = []
    answered: list[str] = []
    done = threading.Event()
    stopper = threading.Thread(target=srv.stop)

    def requests() -> Iterator[pb.InferRequest]:
        i = 0
        while not done.is_set():
            sent.append(f"s-{i}")
            yield image_request(random_images(2, i), random_keep(2, 16, i), request_id=f"s-{i}")
            i += 1
            time.sleep(0.002)

    try:
        with grpc.insecure_channel(srv.address) as channel:
            call = channel.stream_stream(
                STREAM,
                request_serializer=pb.InferRequest.SerializeToString,
                response_deserializer=pb.InferResponse.FromString,
            )
            with pytest.raises(grpc.RpcError) as err:
                for answer in call(requests(), metadata=auth(key), timeout=60):
                    assert not answer.HasField("error"), answer.error
                    answered.append(answer.request_id)
                    if len(answered) == 3:
                        stopper.start()  # stop the server while requests are in flight
    finally:
        done.set()
        if stopper.ident is not None:
            stopper.join(60)
        srv.stop()
    billed = [r["request_id"] for r in ledger_rows(srv.settings.db)]
    assert sorted(billed) == sorted(answered)  # every billed request was answered, and nothing else was billed
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in err.value.details() and "same request_id" in err.value.details()
    assert len(sent) > len(answered) >= 3  # the client was still sending when the stream ended


def test_after_a_client_cancel_a_resend_replays_what_was_billed(served) -> None:
    srv, _ = served
    key = srv.create_key("canceller")
    requests = [
        image_request(random_images(2, 50 + i), random_keep(2, 12, 50 + i), request_id=f"c-{i}") for i in range(12)
    ]
    release = threading.Event()

    def first_try() -> Iterator[pb.InferRequest]:
        yield from requests
        release.wait(30)  # keep the stream open until the client cancels it

    first: dict[str, pb.InferResponse] = {}
    with grpc.insecure_channel(srv.address) as channel:
        call = channel.stream_stream(
            STREAM,
            request_serializer=pb.InferRequest.SerializeToString,
            response_deserializer=pb.InferResponse.FromString,
        )
        answers = call(first_try(), metadata=auth(key), timeout=60)
        for answer in answers:
            first[answer.request_id] = answer
            if len(first) == 2:
                answers.cancel()
                break
        release.set()
        again = {a.request_id: a for a in call(iter(requests), metadata=auth(key), timeout=60)}
    assert set(again) == {r.request_id for r in requests} and not any(a.HasField("error") for a in again.values())
    for request_id, answer in first.items():  # answered before the cancel: the resend replays it, unbilled
        assert again[request_id].usage.replayed
        assert again[request_id].logits.data == answer.logits.data
    rows = [r["request_id"] for r in ledger_rows(srv.settings.db) if r["key"] == "canceller"]
    assert sorted(rows) == sorted(again)  # each request billed exactly once over both streams
