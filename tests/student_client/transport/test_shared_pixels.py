"""TeacherClient(shared_memory=True) against a real teacher on 127.0.0.1 started with --shared-memory: unary calls,
concurrent submits and an InferStream answer as the bytes path does (logits, usage, ledger rows read back with SQL)
while the messages carry no pixels; its regions are one per call in flight and are gone after close. Against a
teacher without the flag, or one not on this host, the pixels go in the messages (with a warning)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch
from student_testkit import ledger_rows, make_subset, teacher_server, tiny_config, tiny_teacher

from maskedkd.codec import tensor_to_proto
from maskedkd.v1 import teacher_pb2 as pb
from student_client.training.context import LocalContext
from student_client.training.train_loop import run_training
from student_client.transport.channel import on_this_host
from student_client.transport.client import TeacherClient
from student_client.transport.outgoing import OutgoingRequest
from student_client.transport.shared_pixels import SharedPixels
from student_client.transport.stream import TeacherStream

pytestmark = pytest.mark.dtype("float32")  # float32 logits on the CPU, compared across the two paths


class Recorder(grpc.UnaryUnaryClientInterceptor):
    """Keeps every Infer request the client puts on the wire."""

    def __init__(self) -> None:
        self.sent: list[pb.InferRequest] = []

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        if isinstance(request, OutgoingRequest):
            self.sent.append(request.whole())  # as it is now (a resend changes its message)
        return continuation(details, request)


def pixels(b: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, 32, 32), generator=g).float() / 255  # exactly k/255: sent as uint8


def keep_of(b: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(64, generator=g)[:k].sort().values for _ in range(b)])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    with teacher_server(tmp_path_factory.mktemp("shm"), tiny_teacher(), max_batch_images=8, shared_memory=True) as srv:
        yield srv


def test_calls_through_shared_memory_answer_and_bill_as_the_bytes_path(server) -> None:  # type: ignore[no-untyped-def]
    key = server.create_key("shm-client")
    recorder = Recorder()
    x, keep = pixels(12, seed=1), keep_of(12, 24, seed=2)  # 12 images: split into requests of 8 and 4
    with (
        TeacherClient(server.address, key, shared_memory=True, interceptors=[recorder]) as shm,
        TeacherClient(server.address, key) as plain,
    ):
        logits, usage = shm.infer(images=x, keep_indices=keep, request_id="via-shm")
        names = shm._shared.names if shm._shared else []
        reference, ref_usage = plain.infer(images=x, keep_indices=keep, request_id="via-bytes")
        futures = [shm.submit(images=x[i : i + 2], keep_indices=keep[i : i + 2], request_id=f"f{i}") for i in (0, 2, 4)]
        parts = [f.result(timeout=60) for f in futures]
        held = shm._shared.names if shm._shared else []
    assert torch.equal(logits, reference) and usage.gflops == ref_usage.gflops and usage.images == 12
    for i, (part, _) in enumerate(parts):
        torch.testing.assert_close(part, reference[2 * i : 2 * i + 2], rtol=1e-5, atol=1e-5)
    infer_calls = [r for r in recorder.sent if r.WhichOneof("input")]
    assert server.server.metrics.shared_memory_bytes._value.get() > 0
    assert infer_calls and all(r.patches.HasField("shm") and not r.patches.data for r in infer_calls)
    assert len(names) == 1 and 1 <= len(held) <= 4  # one region per call in flight, reused
    assert not any(Path("/dev/shm", n).exists() for n in held)  # unlinked at close
    billed = {r["request_id"]: r["gflops"] for r in ledger_rows(server, "shm-client")}
    assert set(billed) == {"via-shm.0", "via-shm.1", "via-bytes.0", "via-bytes.1", "f0", "f2", "f4"}
    assert billed["via-shm.0"] == billed["via-bytes.0"] and billed["via-shm.1"] == billed["via-bytes.1"]


def test_a_stream_sends_its_pixels_through_shared_memory(server) -> None:  # type: ignore[no-untyped-def]
    key = server.create_key("shm-stream")
    x, keep = pixels(4, seed=3), keep_of(4, 16, seed=4)
    with TeacherClient(server.address, key, shared_memory=True) as client:
        reference, _ = client.infer(images=x, keep_indices=keep, request_id="unary")
        with TeacherStream(client) as stream:
            logits, usage = stream.submit(images=x, keep_indices=keep, request_id="streamed").result(timeout=60)
        assert client._shared is not None and len(client._shared.names) == 1
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    assert not usage.replayed and {r["request_id"] for r in ledger_rows(server, "shm-stream")} == {"unary", "streamed"}


def test_without_a_reading_teacher_the_pixels_go_in_the_messages(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    recorder = Recorder()
    with teacher_server(tmp_path, tiny_teacher(), max_batch_images=8) as srv:
        key = srv.create_key("plain")
        with TeacherClient(srv.address, key, shared_memory=True, interceptors=[recorder]) as client:
            logits, usage = client.infer(images=pixels(2, seed=5), keep_indices=keep_of(2, 8, seed=6))
            assert client._shared is None
    assert logits.shape == (2, 10) and usage.images == 2
    assert all(r.patches.data and not r.patches.HasField("shm") for r in recorder.sent if r.WhichOneof("input"))
    assert "does not read shared memory" in capsys.readouterr().err


def test_a_unix_socket_target_sends_the_pixels_in_the_messages(capsys) -> None:  # type: ignore[no-untyped-def]
    """No tensors: over a unix: socket the teacher cannot tell the caller's user, so it would refuse every region."""
    with TeacherClient("unix:/tmp/maskedkd-no-teacher.sock", "k", shared_memory=True) as client:
        assert not client._use_shared_memory()
    assert "unix: socket the teacher cannot tell which user calls" in capsys.readouterr().err


@pytest.mark.parametrize("transport", ["stream", "unary"])
def test_a_training_run_with_teacher_shared_memory_bills_what_it_ran(  # type: ignore[no-untyped-def]
    server, tmp_path, capsys, transport: str
) -> None:
    """float32 on the CPU: `--teacher-shared-memory` through either transport, 2 steps of 2 micro-batches; the
    ledger holds one row per micro-batch, as the bytes path bills, and no fallback was needed."""
    data = make_subset(tmp_path / "data", train_per_class=2, test_per_class=1)
    key = server.create_key(f"train-{transport}")
    cfg = tiny_config(
        data,
        tmp_path / "out",
        teacher=server.address,
        api_key=key,
        epochs=1,
        batch_size=8,
        max_steps=2,
        micro_batches=2,
        transport=transport,
        teacher_shared_memory=True,
    )
    read = server.server.metrics.shared_memory_bytes
    before = read._value.get()
    summary = run_training(cfg, LocalContext())
    assert summary["fatal_error"] == "" and summary["global_step"] == 2
    assert read._value.get() - before >= 16 * 32 * 3 * 4 * 4  # every kept patch of 16 images, at least uint8
    rows = ledger_rows(server, f"train-{transport}")
    assert len(rows) == 4 and sum(r["images"] for r in rows) == 16
    assert summary["teacher_gflops"] == pytest.approx(sum(r["gflops"] for r in rows), rel=1e-9)
    assert "pixels go in the messages" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("target", "local"),
    [
        ("127.0.0.1:50051", True),
        ("localhost:50051", True),
        ("[::1]:50051", True),
        ("ipv4:127.0.0.1:1,127.0.0.2:2", True),
        ("unix:/tmp/teacher.sock", True),
        ("teacher.example:50051", False),
        ("10.0.0.5:50051,127.0.0.1:50051", False),
        ("dns:///teacher.ns.svc:50051", False),
    ],
)
def test_only_targets_on_this_host_use_shared_memory(target: str, local: bool) -> None:
    """No tensors: client target strings."""
    assert on_this_host(target) is local


@pytest.mark.parametrize("kept_apart", [False, True])
def test_a_placed_request_keeps_every_other_field_and_its_bytes_are_in_the_region(kept_apart: bool) -> None:
    """uint8 patches, no server: the request as sent equals the one built, but for where the pixel bytes are; built
    as one message, or with its pixels' bytes kept apart as the client builds it (`OutgoingRequest`)."""
    patches = torch.arange(2 * 3 * 3 * 4 * 4, dtype=torch.int64).remainder(256).to(torch.uint8).view(2, 3, 3, 4, 4)
    built = pb.InferRequest(
        request_id="r-1",
        model="m",
        patches=tensor_to_proto(patches),
        keep_indices=tensor_to_proto(torch.tensor([[0, 5, 9], [1, 2, 3]], dtype=torch.int16)),
        keep_counts=tensor_to_proto(torch.tensor([3, 2], dtype=torch.int32)),
        purpose="probe",
        accept_billed_answer=True,
        outputs=["pre_logits"],
        outputs_dtype="served",
    )
    regions = SharedPixels()
    to_place = built
    if kept_apart:
        message = pb.InferRequest()
        message.CopyFrom(built)
        message.patches.ClearField("data")
        to_place = OutgoingRequest(message, built.patches.data)
    with regions.placed(to_place) as placed:
        (name,) = regions.names
        sent = placed.message
        assert placed.pixels is None and placed.serialize() == sent.SerializeToString()
        assert sent.patches.shm.name == name and sent.patches.shm.offset == 0 and not sent.patches.data
        assert bytes(Path("/dev/shm", name).read_bytes()[: patches.numel()]) == patches.numpy().tobytes()
        back = pb.InferRequest()
        back.CopyFrom(sent)
        back.patches.ClearField("shm")
        back.patches.data = built.patches.data
        assert back == built
    regions.close()
    assert regions.names == [] and not Path("/dev/shm", name).exists()
