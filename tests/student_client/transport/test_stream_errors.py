"""TeacherStream and per-message error answers: a request the teacher refuses fails its own future with the mapped
TeacherError while the others are answered and billed as usual (a real teacher), and a transient per-message status
is resent under the same request_id (a scripted TeacherService on a real gRPC server); TeacherStreams spreads batches
over the client's connections, each sent once."""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
import torch
from student_testkit import ledger_rows, teacher_server, tiny_teacher

from maskedkd.codec import tensor_to_proto
from maskedkd.geometry import TeacherGeometry
from maskedkd.v1 import teacher_pb2 as pb
from maskedkd.v1 import teacher_pb2_grpc as pb_grpc
from student_client.errors import TeacherInputError, TeacherUnavailableError
from student_client.transport.client import TeacherClient
from student_client.transport.stream import TeacherStream, TeacherStreams

pytestmark = [pytest.mark.dtype("float32"), pytest.mark.timeout(120)]

GRAY = (0.5, 0.5, 0.5)
# the scripted teacher's: 32x32 images of 4x4 patches (an 8x8 grid), 10 classes, no prefix tokens
SCRIPTED = TeacherGeometry((32, 32), patch_size=4, in_chans=3, num_prefix_tokens=0, num_classes=10, mean=GRAY, std=GRAY)


def test_a_refused_request_fails_only_its_own_future(tmp_path) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (2, 3, 32, 32), generator=g).float() / 255  # [B, C, H, W], exactly k/255
    keep = torch.stack([torch.randperm(64, generator=g)[:8].sort().values for _ in range(2)])  # [B, K]
    too_bright = images.clone()
    row, col = divmod(int(keep[1, 0]), 8)  # a kept patch of image 1 (8x8 grid of 4x4 patches)
    too_bright[1, 0, 4 * row, 4 * col] = 1.5  # the client sends it (float16); the teacher refuses pixels past 1
    repeats = keep.clone()
    repeats[1, 1] = repeats[1, 0]  # the client refuses a repeated position itself: it is never sent
    with teacher_server(tmp_path, tiny_teacher()) as srv:
        client = TeacherClient(srv.address, srv.create_key("streamer"))
        with TeacherStream(client) as stream:
            futures = {
                rid: stream.submit(images=x, keep_indices=k, request_id=rid)
                for rid, x, k in [
                    ("a", images, keep),
                    ("bad", too_bright, keep),
                    ("local", images, repeats),
                    ("b", images.flip(0), keep.flip(0)),
                ]
            }
            with pytest.raises(TeacherInputError) as err:
                futures["bad"].result(timeout=30)
            with pytest.raises(TeacherInputError, match="keep_indices row 1 repeats position") as local:
                futures["local"].result(timeout=30)
            logits = {rid: futures[rid].result(timeout=30)[0] for rid in ("a", "b")}
        assert err.value.code == local.value.code == "INVALID_ARGUMENT"
        assert "request_id 'bad'" in str(err.value) and "un-normalized in [0, 1]" in str(err.value)
        torch.testing.assert_close(logits["a"], logits["b"].flip(0), rtol=1e-5, atol=1e-5)
        assert sorted(r["request_id"] for r in ledger_rows(srv, "streamer")) == ["a", "b"]


class _ScriptedTeacher(pb_grpc.TeacherServiceServicer):
    """Answers by request_id: "flaky-*" UNAVAILABLE on the first attempt then logits, "down-*" always UNAVAILABLE,
    "bad-*" INVALID_ARGUMENT; counts the attempts per id."""

    def __init__(self) -> None:
        self.attempts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def GetModelInfo(self, request: pb.ModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        return pb.ModelInfo(model="scripted", max_batch_images=8, **SCRIPTED.proto_fields())

    def InferStream(
        self, requests: Iterator[pb.InferRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.InferResponse]:
        for request in requests:
            rid = request.request_id
            with self._lock:
                self.attempts[rid] += 1
                first = self.attempts[rid] == 1
            if rid.startswith("down") or (rid.startswith("flaky") and first):
                code, message = grpc.StatusCode.UNAVAILABLE, "ledger busy; not billed, retry"
            elif rid.startswith("bad"):
                code, message = grpc.StatusCode.INVALID_ARGUMENT, "keep_indices row 0 repeats position 3"
            else:
                yield pb.InferResponse(
                    request_id=rid, logits=tensor_to_proto(torch.full((2, 10), 7.0)), usage=pb.Usage(images=2)
                )
                continue
            yield pb.InferResponse(request_id=rid, error=pb.Status(code=code.value[0], message=message))


@contextlib.contextmanager
def scripted_server(teacher: pb_grpc.TeacherServiceServicer) -> Iterator[str]:
    """A real gRPC server on 127.0.0.1 answering with `teacher`; yields its address."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_TeacherServiceServicer_to_server(teacher, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


def test_transient_message_errors_are_resent_under_the_same_id() -> None:
    teacher = _ScriptedTeacher()
    with scripted_server(teacher) as address:
        client = TeacherClient(address, "mkd_" + "s" * 43, max_retries=2, backoff=0.01, patience_s=0)
        images, keep = torch.zeros(2, 3, 32, 32), torch.arange(8).repeat(2, 1)  # [B, C, H, W], [B, K]
        with TeacherStream(client) as stream:
            got = {
                rid: stream.submit(images=images, keep_indices=keep, request_id=rid)
                for rid in ("flaky-1", "down-1", "bad-1", "ok-1")
            }
            logits, usage = got["flaky-1"].result(timeout=30)
            with pytest.raises(TeacherUnavailableError, match="request_id 'down-1': ledger busy"):
                got["down-1"].result(timeout=30)
            with pytest.raises(TeacherInputError, match="repeats position 3"):
                got["bad-1"].result(timeout=30)
            assert got["ok-1"].result(timeout=30)[1].images == 2
        assert torch.equal(logits, torch.full((2, 10), 7.0)) and usage.images == 2
        assert teacher.attempts == {"flaky-1": 2, "down-1": 3, "bad-1": 1, "ok-1": 1}  # max_retries=2 resends


class _PeerRecorder(_ScriptedTeacher):
    """Answers every request with logits once `release` is set; records which connection (peer) each came on."""

    def Infer(self, request: pb.InferRequest, context: grpc.ServicerContext) -> pb.InferResponse:
        self.release.wait(30)
        return pb.InferResponse(
            request_id=request.request_id, logits=tensor_to_proto(torch.zeros(2, 10)), usage=pb.Usage(images=2)
        )

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.peers: dict[str, str] = {}

    def InferStream(
        self, requests: Iterator[pb.InferRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.InferResponse]:
        for request in requests:
            with self._lock:
                self.peers[request.request_id] = context.peer()
                self.attempts[request.request_id] += 1
            self.release.wait(30)
            yield pb.InferResponse(
                request_id=request.request_id, logits=tensor_to_proto(torch.zeros(2, 10)), usage=pb.Usage(images=2)
            )


def test_streams_over_several_connections_share_the_batches() -> None:
    """`TeacherStreams` on a client of 3 connections: a stream on each (3 peers seen by a real gRPC server), each batch
    to the stream with the fewest answers outstanding, so 6 batches in flight go 2 to each; all answered."""
    teacher = _PeerRecorder()
    with scripted_server(teacher) as address:
        client = TeacherClient(address, "mkd_" + "s" * 43, connections=3)
        images, keep = torch.zeros(2, 3, 32, 32), torch.arange(8).repeat(2, 1)  # [B, C, H, W], [B, K]
        with TeacherStreams(client) as streams:
            got = [streams.submit(images=images, keep_indices=keep, request_id=f"r{i}") for i in range(6)]
            assert streams.in_flight == 6 and [s.in_flight for s in streams.streams] == [2, 2, 2]
            teacher.release.set()
            assert all(f.result(timeout=30)[1].images == 2 for f in got)
        assert teacher.attempts == {f"r{i}": 1 for i in range(6)}  # sent once each (opening a stream sent its first
        # request twice: once as pending at the opening, once as new)
        assert sorted(Counter(teacher.peers.values()).values()) == [2, 2, 2]  # three connections, two batches each
        client.close()


def test_requests_are_built_off_the_callers_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """A submitted batch's request (kept patches gathered, checked, encoded) is built on the stream's encoder thread,
    or the client's pool for unary calls, not on the caller's (training) thread; a request id still in flight is
    refused at once (float32 pixels, CPU)."""
    import student_client.transport.wire as wire

    built_on: list[str] = []
    build = wire.build_request

    def observed(*args: Any, **kwargs: Any) -> pb.InferRequest:
        built_on.append(threading.current_thread().name)
        return build(*args, **kwargs)

    monkeypatch.setattr(wire, "build_request", observed)
    teacher = _PeerRecorder()
    images, keep = torch.zeros(2, 3, 32, 32), torch.arange(8).repeat(2, 1)  # [B, C, H, W], [B, K]
    with scripted_server(teacher) as address:
        client = TeacherClient(address, "mkd_" + "s" * 43)
        with TeacherStream(client) as stream:
            first = stream.submit(images=images, keep_indices=keep, request_id="s")
            with pytest.raises(ValueError, match="request_id 's' is already in flight"):
                stream.submit(images=images, keep_indices=keep, request_id="s")
            teacher.release.set()
            assert first.result(timeout=30)[1].images == 2
        assert client.submit(images=images, keep_indices=keep, request_id="u").result(timeout=30)[1].images == 2
        client.close()
    assert [name.rsplit("_", 1)[0] for name in built_on] == ["teacher-stream-encode", "teacher-client"]
