"""TeacherClient, AsyncTeacherClient and TeacherStream against a real teacher server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import grpc
import pytest
import torch
import torch.nn.functional as F
from student_testkit import ledger_rows, make_subset, teacher_server, tiny_teacher, train_flags

from maskedkd.masked_teacher import MaskedTeacher
from maskedkd.v1 import teacher_pb2 as pb
from student_client.cli import main as student_cli
from student_client.errors import TeacherAuthError, TeacherInputError, TeacherQuotaError, TeacherUnavailableError
from student_client.transport.aio_client import AsyncTeacherClient
from student_client.transport.client import TeacherClient
from student_client.transport.outgoing import OutgoingRequest
from student_client.transport.stream import TeacherStream
from student_client.transport.tls import channel_credentials
from student_client.transport.wire import wire_pixels
from teacher_server.testing.tls import make_pki

pytestmark = pytest.mark.dtype("float32")  # compared with float32 references, on the CPU


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    model = tiny_teacher()
    with teacher_server(tmp_path_factory.mktemp("client"), model, max_batch_images=8) as srv:
        srv.reference = MaskedTeacher(model)  # type: ignore[attr-defined]
        yield srv


def reference_logits(srv, images: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The teacher run in-process on the same pixels, normalized the way the server says it normalizes."""
    mt: MaskedTeacher = srv.reference
    mean, std = torch.tensor(mt.geometry.mean).view(1, -1, 1, 1), torch.tensor(mt.geometry.std).view(1, -1, 1, 1)
    with torch.no_grad():
        return mt((images.float() - mean) / std, keep)


def pixels(b: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """[b, 3, size, size] float pixels that are exactly k/255 (what ToTensor gives)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, size, size), generator=g).float() / 255


def random_keep(b: int, k: int, n: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g)[:k].sort().values for _ in range(b)])


class Recorder(grpc.UnaryUnaryClientInterceptor):
    """Keeps every request the client puts on the wire; with `lose_first`, the first answer is lost after the
    server ran (and billed) it, as when a connection drops on the way back."""

    def __init__(self, lose_first: bool = False) -> None:
        self.sent: list[object] = []
        self.lose_first = lose_first

    def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        self.sent.append(request.whole() if isinstance(request, OutgoingRequest) else request)  # as it is now
        outcome = continuation(client_call_details, request)
        if self.lose_first and isinstance(request, OutgoingRequest):
            self.lose_first = False
            outcome.result()  # the server has answered and written the ledger
            raise LostResponse()
        return outcome


class LostResponse(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection reset while reading the response"

    def initial_metadata(self):
        return ()  # type: ignore[no-untyped-def]

    def trailing_metadata(self):
        return ()  # type: ignore[no-untyped-def]

    def is_active(self):
        return False  # type: ignore[no-untyped-def]

    def time_remaining(self):
        return None  # type: ignore[no-untyped-def]

    def cancel(self):
        return False  # type: ignore[no-untyped-def]

    def add_callback(self, cb):
        return False  # type: ignore[no-untyped-def]


def test_infer_sends_only_kept_patches_as_uint8_and_matches_in_process_teacher(server) -> None:  # type: ignore[no-untyped-def]
    rec = Recorder()
    client = TeacherClient(server.address, server.create_key("patches"), interceptors=[rec])
    x, keep = pixels(3), random_keep(3, 16)
    logits, usage = client.infer(images=x, keep_indices=keep)
    torch.testing.assert_close(logits, reference_logits(server, x, keep), rtol=1e-5, atol=1e-5)

    req = next(r for r in rec.sent if isinstance(r, pb.InferRequest))
    assert req.WhichOneof("input") == "patches"
    assert req.patches.dtype == "uint8" and list(req.patches.shape) == [3, 16, 3, 4, 4]
    assert len(req.patches.data) == 3 * 16 * 3 * 4 * 4  # a quarter of the full image's 3*3*32*32 bytes
    # the patch bytes are the pixels at the kept positions, cut independently here
    grid = (x * 255).round().to(torch.uint8).unfold(2, 4, 4).unfold(3, 4, 4)  # [B, C, 8, 8, 4, 4]
    expected = torch.stack([grid[b].permute(1, 2, 0, 3, 4).reshape(64, 3, 4, 4)[keep[b]] for b in range(3)])
    assert req.patches.data == expected.numpy().tobytes()
    assert usage.gflops == pytest.approx(3 * server.reference.gflops(16), rel=1e-9)
    assert usage.full_gflops == pytest.approx(3 * server.reference.gflops(64), rel=1e-9)


def test_float_pixels_travel_as_float16_and_full_images_when_no_keep(server) -> None:  # type: ignore[no-untyped-def]
    rec = Recorder()
    client = TeacherClient(server.address, server.create_key("float16"), interceptors=[rec])
    x = pixels(2) * 0.7 + 0.1  # no longer k/255, like mixup output
    assert wire_pixels(x).dtype == torch.float16 and wire_pixels(pixels(2)).dtype == torch.uint8
    logits, usage = client.infer(images=x)
    req = next(r for r in rec.sent if isinstance(r, pb.InferRequest))
    assert req.WhichOneof("input") == "images" and req.images.dtype == "float16"
    torch.testing.assert_close(logits, reference_logits(server, x.half().float(), None), rtol=1e-4, atol=1e-4)
    assert usage.gflops == pytest.approx(usage.full_gflops)


def test_ragged_keep_counts_and_split_batches(server) -> None:  # type: ignore[no-untyped-def]
    client = TeacherClient(server.address, server.create_key("ragged"))
    x, keep = pixels(10, seed=3), random_keep(10, 20, seed=3)
    counts = torch.tensor([20, 12, 5, 20, 1, 7, 20, 3, 9, 11])
    logits, usage = client.infer(images=x, keep_indices=keep, keep_counts=counts, request_id="split-1")
    expected = torch.cat([reference_logits(server, x[i : i + 1], keep[i : i + 1, : counts[i]]) for i in range(10)])
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert usage.requests == 2  # 10 images over max_batch_images=8
    ids = sorted(r["request_id"] for r in ledger_rows(server, "ragged"))
    assert ids == ["split-1.0", "split-1.1"]
    assert usage.gflops == pytest.approx(sum(server.reference.gflops(int(c)) for c in counts), rel=1e-9)


def test_lost_response_is_retried_with_the_same_request_id_and_billed_once(server) -> None:  # type: ignore[no-untyped-def]
    rec = Recorder(lose_first=True)
    client = TeacherClient(server.address, server.create_key("retry"), interceptors=[rec], backoff=0.01)
    x, keep = pixels(2, seed=5), random_keep(2, 32, seed=5)
    logits, usage = client.infer(images=x, keep_indices=keep)
    infer_requests = [r for r in rec.sent if isinstance(r, pb.InferRequest)]
    assert len(infer_requests) == 2 and infer_requests[0].request_id == infer_requests[1].request_id
    assert usage.replayed  # answered from the ledger
    rows = ledger_rows(server, "retry")
    assert len(rows) == 1 and rows[0]["request_id"] == infer_requests[0].request_id
    assert rows[0]["gflops"] == pytest.approx(2 * server.reference.gflops(32), rel=1e-9)
    torch.testing.assert_close(logits, reference_logits(server, x, keep), rtol=1e-5, atol=1e-5)


def test_errors_are_typed_one_line_and_unbilled(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    x = pixels(1)
    with pytest.raises(TeacherAuthError) as bad_key:
        TeacherClient(server.address, "mkd_" + "x" * 43).infer(images=x)
    with pytest.raises(TeacherAuthError):
        TeacherClient(server.address, "mkd_" + "x" * 43).check_key()
    TeacherClient(server.address, server.create_key("good")).check_key()

    poor = TeacherClient(server.address, server.create_key("poor", quota_gflops=1e-6))
    with pytest.raises(TeacherQuotaError) as quota:
        poor.infer(images=x)
    client = TeacherClient(server.address, server.create_key("bad-input"))
    with pytest.raises(TeacherInputError) as bad_index:
        client.infer(images=x, keep_indices=torch.tensor([[1, 999]]))
    with pytest.raises(TeacherInputError) as bad_model:
        TeacherClient(server.address, server.create_key("model"), model="no-such-model").info()

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(TeacherUnavailableError) as unreachable:
        TeacherClient(dead, "k", max_retries=2, backoff=0.01, timeout_s=2, patience_s=0).info()

    for err in (bad_key, quota, bad_index, bad_model, unreachable):
        message = str(err.value)
        assert "\n" not in message and message
    assert "999" in str(bad_index.value) or "range" in str(bad_index.value)
    assert "after 3 attempts" in str(unreachable.value)
    assert ledger_rows(server, "poor") == [] and ledger_rows(server, "bad-input") == []


def test_resizes_to_the_teacher_resolution(tmp_path: Path) -> None:
    model = tiny_teacher(img_size=48, patch_size=8)  # 6x6 grid
    with teacher_server(tmp_path, model) as srv:
        client = TeacherClient(srv.address, srv.create_key("hires"))
        assert client.info().image_size == (48, 48) and client.info().grid_size == (6, 6)
        x, keep = pixels(2), random_keep(2, 18, n=36)
        logits, _ = client.infer(images=x, keep_indices=keep)
        big = F.interpolate(x, size=(48, 48), mode="bilinear", align_corners=False)
        mt = MaskedTeacher(model)
        ref = mt((big.half().float() - 0.5) / 0.5, keep)  # resized pixels are not k/255: they go as float16
        torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


def test_stream_matches_unary_and_fails_cleanly_on_a_bad_key(server) -> None:  # type: ignore[no-untyped-def]
    client = TeacherClient(server.address, server.create_key("stream"))
    batches = [(pixels(2, seed=s), random_keep(2, 8 * (s + 1), seed=s)) for s in range(4)]
    with TeacherStream(client) as stream:
        futures = [stream.submit(images=x, keep_indices=k, request_id=f"s{i}") for i, (x, k) in enumerate(batches)]
        results = [f.result(timeout=30) for f in futures]
    for (x, k), (logits, usage) in zip(batches, results, strict=True):
        torch.testing.assert_close(logits, reference_logits(server, x, k), rtol=1e-5, atol=1e-5)
        assert usage.gflops == pytest.approx(2 * server.reference.gflops(k.shape[1]), rel=1e-9)
    assert sorted(r["request_id"] for r in ledger_rows(server, "stream")) == ["s0", "s1", "s2", "s3"]

    with pytest.raises(TeacherAuthError):  # GetModelInfo, the stream's first call, refuses a wrong key
        TeacherStream(TeacherClient(server.address, "mkd_" + "y" * 43))


def test_submitted_calls_are_built_and_sent_on_threads_that_run_torch_alone(server) -> None:  # type: ignore[no-untyped-def]
    """`submit` builds and sends on helper threads (maskedkd/torch_threads.py): torch runs on one thread there, so a
    training thread's OpenMP team stays the process's only one (float32, CPU)."""
    seen: list[int] = []

    class Recording(TeacherClient):
        def infer_request(self, request: OutgoingRequest | pb.InferRequest) -> pb.InferResponse:
            seen.append(torch.get_num_threads())
            return super().infer_request(request)

    client = Recording(server.address, server.create_key("threads"))
    logits, _ = client.submit(images=pixels(2), keep_indices=random_keep(2, 8)).result(timeout=30)
    client.close()
    assert seen == [1] and logits.shape[0] == 2


async def test_async_client_matches_the_in_process_teacher(server) -> None:  # type: ignore[no-untyped-def]
    key = server.create_key("aio")
    x, keep = pixels(3, seed=9), random_keep(3, 24, seed=9)
    async with AsyncTeacherClient(server.address, key) as client:
        (a, _ua), (b, _ub) = await asyncio.gather(
            client.infer(images=x, keep_indices=keep, request_id="a1"),
            client.infer(images=x, keep_indices=keep, request_id="a1"),
        )
        with pytest.raises(TeacherInputError):
            await client.infer(images=x, keep_indices=torch.tensor([[0, 0, 70]] * 3))
    torch.testing.assert_close(a, reference_logits(server, x, keep), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a, b)
    assert len(ledger_rows(server, "aio")) == 1  # same request_id twice: billed once


async def test_purpose_labels_every_clients_rows_and_a_bad_label_never_leaves(server) -> None:  # type: ignore[no-untyped-def]
    key = server.create_key("purposes")
    x, keep = pixels(2, seed=4), random_keep(2, 8, seed=4)
    rec = Recorder()
    client = TeacherClient(server.address, key, interceptors=[rec])
    plain, _ = client.infer(images=x, keep_indices=keep, request_id="plain")
    labelled, _ = client.infer(images=x, keep_indices=keep, request_id="eval", purpose="eval")
    torch.testing.assert_close(labelled, plain)  # the label changes nothing but the ledger's row
    with TeacherStream(client) as stream:
        stream.submit(images=x, keep_indices=keep, request_id="streamed", purpose="probe").result(timeout=30)
    async with AsyncTeacherClient(server.address, key) as aio:
        await aio.infer(images=x, keep_indices=keep, request_id="aio", purpose="probe")
        with pytest.raises(TeacherInputError, match="lowercase letters"):
            await aio.infer(images=x, keep_indices=keep, request_id="bad-aio", purpose="Probe")
    sent = len(rec.sent)
    for bad, words in (("has space", "lowercase letters"), ("p" * 33, "33 characters; at most 32")):
        with pytest.raises(TeacherInputError, match=words):
            client.infer(images=x, keep_indices=keep, request_id="bad", purpose=bad)
    assert len(rec.sent) == sent  # refused by the client: nothing went out
    assert [r.purpose for r in rec.sent if isinstance(r, pb.InferRequest)] == ["", "eval"]
    assert {r["request_id"]: r["purpose"] for r in ledger_rows(server, "purposes")} == {
        "plain": "",
        "eval": "eval",
        "streamed": "probe",
        "aio": "probe",
    }


async def test_async_client_and_stream_over_mutual_tls(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    with teacher_server(
        tmp_path, tiny_teacher(), tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca
    ) as srv:
        key = srv.create_key("mtls")
        tls = {"ca_file": pki.ca, "client_cert": pki.client_cert, "client_key": pki.client_key}
        async with AsyncTeacherClient(srv.address, key, **tls) as client:
            _, usage = await client.infer(images=pixels(2), request_id="aio-tls")
        with TeacherStream(TeacherClient(srv.address, key, **tls)) as stream:
            _, streamed = stream.submit(images=pixels(1), request_id="stream-tls").result(timeout=60)
        async with AsyncTeacherClient(
            srv.address, key, ca_file=pki.ca, max_retries=0, timeout_s=5, patience_s=0
        ) as no_cert:
            with pytest.raises(TeacherUnavailableError):
                await no_cert.infer(images=pixels(1))
        rows = ledger_rows(srv, "mtls")
    assert [r["request_id"] for r in rows] == ["aio-tls", "stream-tls"]
    assert [r["cost"] for r in rows] == pytest.approx([usage.cost, streamed.cost], rel=1e-12)


def test_student_cli_trains_against_a_mutual_tls_teacher(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pki = make_pki(tmp_path / "pki")
    data = make_subset(tmp_path / "data", train_per_class=1, test_per_class=1)
    monkeypatch.delenv("MASKEDKD_API_KEY", raising=False)
    with teacher_server(
        tmp_path, tiny_teacher(), tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca
    ) as srv:
        key = srv.create_key("cli-tls")
        run = {"batch_size": 4, "max_steps": 1, "local": True, "progress": False, "eval": False}
        common = train_flags(teacher=srv.address, api_key=key, data=data, **run)
        tls = ["--teacher-ca", pki.ca, "--teacher-client-cert", pki.client_cert, "--teacher-client-key", pki.client_key]
        assert student_cli([*common, "--out", str(tmp_path / "ok"), *tls]) == 0, capsys.readouterr().err
        billed = len(ledger_rows(srv, "cli-tls"))
        printed = capsys.readouterr()
        assert billed >= 1 and "student: top-1" not in printed.err
        # 10 images at batch 4 are 3 steps an epoch; --max-steps 1 stops inside the first
        assert "done: 0 epochs + 1 steps of epoch 1 (stopped by --max-steps), 1 steps, 4 images" in printed.out
        code = student_cli([*common, "--out", str(tmp_path / "no-cert"), "--teacher-ca", pki.ca])
        err = capsys.readouterr().err
        assert code != 0 and err.count("\n") == 1 and err.startswith("student-client: error:")
        assert len(ledger_rows(srv, "cli-tls")) == billed
    code = student_cli([*common, "--out", str(tmp_path / "bad"), "--teacher-ca", str(tmp_path / "missing.pem")])
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and "cannot read teacher CA file" in err and "missing.pem" in err


def test_tls_credentials_need_a_key_with_a_certificate(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    with pytest.raises(ValueError, match="needs its key"):
        channel_credentials(ca_file=pki.ca, client_cert=pki.client_cert)
    assert channel_credentials() is None and channel_credentials(ca_file=pki.ca) is not None
