"""Bad input and bad keys over real gRPC: the right status, a message naming the problem, nothing billed, and the
server keeps serving."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import pytest
import service_testkit as kit
import torch
from service_testkit import auth, image_request, ledger_rows, patch_request, stub
from sqlalchemy import delete

from maskedkd.codec import tensor_to_proto
from maskedkd.v1 import teacher_pb2 as pb
from teacher_server.ledger import keys, models
from teacher_server.testing.server import running_server

pytestmark = [pytest.mark.dtype("float32"), pytest.mark.timeout(120)]

IMAGES = kit.random_images(2, 11)  # [2, 3, 32, 32] uint8
KEEP = kit.random_keep(2, 8, 11)  # [2, 8]
PATCHES = kit.patches_of(IMAGES, KEEP)


def _truncated() -> pb.InferRequest:
    req = image_request(IMAGES, KEEP)
    req.images.data = req.images.data[:-3]
    return req


def _wire_dtype(dtype: str) -> pb.InferRequest:
    req = image_request(IMAGES, KEEP)
    req.images.dtype = dtype
    return req


def _with(row: int, col: int, value: int) -> pb.InferRequest:
    keep = KEEP.clone()
    keep[row, col] = value
    return image_request(IMAGES, keep)


def _nan() -> pb.InferRequest:
    x = IMAGES.float() / 255
    x[0, 0, 0, 0] = float("nan")
    return image_request(x, KEEP)


def _huge_dims() -> pb.InferRequest:
    req = image_request(IMAGES, KEEP)
    req.images.shape[:] = [2, 3, 1 << 62, 1 << 62]
    return req


def _shape(shape: list[int], data: bytes = b"") -> pb.InferRequest:
    req = image_request(IMAGES, KEEP)
    del req.images.shape[:]
    req.images.shape.extend(shape)
    req.images.data = data
    return req


def _purpose(label: str) -> pb.InferRequest:
    req = image_request(IMAGES, KEEP, request_id="labelled")
    req.purpose = label
    return req


BAD_INPUTS: dict[str, tuple[Callable[[], pb.InferRequest], str]] = {  # case -> (request, words the message needs)
    "no input": (lambda: pb.InferRequest(), "no input"),
    "unknown wire dtype": (lambda: _wire_dtype("float64"), "unsupported dtype 'float64'"),
    "integer pixels": (lambda: image_request(IMAGES.to(torch.int32), KEEP), "dtype int32 is not a pixel type"),
    "byte count": (_truncated, "bytes"),
    "image shape": (lambda: image_request(IMAGES[0], KEEP), "must be [B, C, H, W]"),
    "image size": (lambda: image_request(IMAGES[:, :, :28, :28].contiguous(), KEEP), "size 28x28"),
    "channel count": (lambda: image_request(IMAGES[:, :1].contiguous(), KEEP), "1 channels"),
    "too many images": (lambda: image_request(kit.random_images(5, 0)), "max_batch_images=4"),
    "empty batch": (lambda: image_request(IMAGES[:0]), "empty batch"),
    "float pixels out of [0,1]": (lambda: image_request(IMAGES.float(), KEEP), "[0, 1]"),
    "nan pixels": (_nan, "finite"),
    "index out of range": (lambda: _with(0, 3, 64), "keep_indices[0, 3] = 64 is out of range"),
    "negative index": (lambda: _with(1, 0, -1), "keep_indices[1, 0] = -1 is out of range"),
    "duplicated index": (lambda: _with(1, 5, int(KEEP[1, 2])), f"row 1 repeats position {int(KEEP[1, 2])}"),
    "float indices": (lambda: image_request(IMAGES, KEEP.float()), "keep_indices: dtype float32 is not an integer"),
    "indices batch": (lambda: image_request(IMAGES, KEEP[:1]), "keep_indices: shape [1, 8] must be [B, K]"),
    "K above the grid": (lambda: image_request(IMAGES, torch.arange(65).repeat(2, 1)), "exceeds the 64 patches"),
    "K disagrees with patches": (lambda: patch_request(PATCHES, KEEP[:, :6]), "K = 6 disagrees with patches"),
    "count above K": (lambda: image_request(IMAGES, KEEP, counts=torch.tensor([8, 9])), "keep_counts[1] = 9"),
    "zero count": (lambda: image_request(IMAGES, KEEP, counts=torch.tensor([0, 8])), "keep_counts[0] = 0"),
    "counts shape": (lambda: image_request(IMAGES, KEEP, counts=torch.tensor([8])), "keep_counts: shape [1]"),
    "counts without indices": (lambda: image_request(IMAGES, counts=torch.tensor([8, 8])), "keep_counts needs"),
    "patches without indices": (lambda: pb.InferRequest(patches=tensor_to_proto(PATCHES)), "keep_indices are required"),
    "patch shape": (lambda: patch_request(PATCHES[0], KEEP), "must be [B, K, C, P, P]"),
    "patch size": (lambda: patch_request(PATCHES[..., :3, :3].contiguous(), KEEP), "patch size 3x3"),
    "request_id too long": (lambda: image_request(IMAGES, KEEP, request_id="x" * 201), "request_id is 201"),
    "purpose in capitals": (lambda: _purpose("Probe"), "purpose 'Probe' may hold only lowercase letters"),
    "purpose with a NUL": (lambda: _purpose("probe\x00"), "may hold only lowercase letters, digits"),
    "purpose too long": (lambda: _purpose("p" * 33), "is 33 characters; at most 32"),
    "65 dimensions": (lambda: _shape([1] * 65, b"\x00"), "65 dimensions; at most 16"),
    "huge dimensions": (_huge_dims, "elements exceed the limit"),
    "zero-size with huge dimensions": (lambda: _shape([0, 3, 1 << 40, 1 << 40]), "zero-size shape"),
    "negative dimension": (lambda: _shape([2, 3, -32, -32]), "negative dimension"),
}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    cfg = kit.settings(tmp_path_factory.mktemp("errors"), max_batch_images=4, auth_cache_s=0.3)
    with running_server(cfg, model=kit.tiny_vit(seed=2)) as srv:
        yield srv, srv.create_key("mallory")


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_invalid_argument_naming_the_problem(served, case: str) -> None:
    srv, key = served
    build, words = BAD_INPUTS[case]
    channel, teacher = stub(srv.address)
    with pytest.raises(grpc.RpcError) as err:
        teacher.Infer(build(), metadata=auth(key))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in err.value.details()
    assert "Traceback" not in err.value.details()
    assert [r["request_id"] for r in ledger_rows(srv.settings.db)] == []
    channel.close()


def _raw(request: pb.InferRequest) -> bytes:
    return request.SerializeToString()


UNDECODABLE: dict[str, tuple[bytes, str]] = {  # case -> (raw request bytes, words the message needs)
    "truncated message": (_raw(image_request(IMAGES, KEEP))[:-5], "keep_indices: 142 bytes announced"),
    "invalid UTF-8 request_id": (
        _raw(image_request(IMAGES, KEEP, request_id="rid")).replace(b"rid", b"r\xffd"),
        "request_id is not valid UTF-8",
    ),
    "invalid UTF-8 model": (
        _raw(image_request(IMAGES, KEEP, model="vit")).replace(b"vit", b"v\xc3("),
        "model is not valid UTF-8",
    ),
    "garbage": (bytes(range(256)) * 4, "not a valid maskedkd.v1.InferRequest"),
    "unterminated group": (b"\x0b", "wire type 3"),
}


@pytest.mark.parametrize("case", list(UNDECODABLE))
def test_undecodable_bytes_are_invalid_argument_naming_the_problem(served, case: str) -> None:
    srv, key = served
    raw, words = UNDECODABLE[case]
    with grpc.insecure_channel(srv.address) as channel, pytest.raises(grpc.RpcError) as err:
        channel.unary_unary("/maskedkd.v1.TeacherService/Infer")(raw, metadata=auth(key), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert words in err.value.details() and len(err.value.details()) <= 300, err.value.details()
    assert ledger_rows(srv.settings.db) == []


def test_an_undecodable_model_info_request_is_invalid_argument(served) -> None:
    srv, _ = served
    with grpc.insecure_channel(srv.address) as channel, pytest.raises(grpc.RpcError) as err:
        channel.unary_unary("/maskedkd.v1.TeacherService/GetModelInfo")(b"\x0a\x02\xff\xfe", timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "the request is not a valid maskedkd.v1.ModelInfoRequest: model is not valid UTF-8"


def test_echoed_input_is_clipped(served) -> None:
    srv, key = served
    channel, teacher = stub(srv.address)
    cases = {
        grpc.StatusCode.NOT_FOUND: image_request(IMAGES, KEEP, model="m" * 5000),
        grpc.StatusCode.INVALID_ARGUMENT: _wire_dtype("d" * 5000),
    }
    for code, request in cases.items():
        with pytest.raises(grpc.RpcError) as err:
            teacher.Infer(request, metadata=auth(key))
        assert err.value.code() == code
        assert "(5000 chars)" in err.value.details() and len(err.value.details()) <= 200, err.value.details()
    channel.close()


def _forget_usage(srv) -> None:  # type: ignore[no-untyped-def]
    """Empty the usage table so the next test of this module can assert that nothing was billed."""
    with srv.server.sessions() as s:
        s.execute(delete(models.UsageRecord))
        s.commit()


def test_missing_malformed_unknown_and_disabled_keys_are_unauthenticated(served) -> None:
    srv, key = served
    channel, teacher = stub(srv.address)
    request = image_request(IMAGES, KEEP)
    victim = srv.create_key("trudy")
    assert teacher.Infer(request, metadata=auth(victim)).usage.images == 2  # works (and is now cached)
    with srv.server.sessions() as s:  # as `teacher-server keys disable` would, from another process
        keys.set_api_key_disabled(s, name="trudy")
    _forget_usage(srv)
    time.sleep(0.4)  # auth_cache_s=0.3: the cached "enabled" expires
    cases = {
        "missing API key": None,
        "malformed authorization": [("authorization", f"Basic {key}")],
        "unknown API key": auth("mkd_" + "A" * 43),
        "'trudy' is disabled": auth(victim),
    }
    for words, metadata in cases.items():
        for call in (
            lambda: teacher.Infer(request, metadata=metadata),
            lambda: list(teacher.InferStream(iter([request]), metadata=metadata)),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, words
            assert words in err.value.details()
    assert ledger_rows(srv.settings.db) == []
    assert teacher.Infer(request, metadata=auth(key)).usage.images == 2  # the server is still fine
    channel.close()
