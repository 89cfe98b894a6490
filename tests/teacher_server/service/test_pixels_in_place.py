"""A request's pixels read where they arrived (`service/wire/pixels_in_place.py`): the split parses to exactly what
protobuf parses from the whole message, its pixels are a view of the received bytes, and every other layout goes to
protobuf whole; a served request takes it and is answered and billed as before (float32, CPU)."""

from __future__ import annotations

import random
from typing import Any

import grpc
import pytest
import service_testkit as kit
import torch

from maskedkd.codec import tensor_to_proto
from maskedkd.v1 import teacher_pb2 as pb
from teacher_server.service.wire.pixels_in_place import (
    MAX_FIELDS,
    InferWithPixels,
    deserialize_infer_request,
    split_pixels,
)
from teacher_server.testing.server import running_server

pytestmark = pytest.mark.dtype("float32")

model = kit.model_fixture(seed=3)


def patches_request(batch: int = 2, k: int = 6, seed: int = 0, **fields: Any) -> pb.InferRequest:
    keep = kit.random_keep(batch, k, seed)
    request = kit.patch_request(kit.patches_of(kit.random_images(batch, seed), keep), keep, request_id=f"r{seed}")
    for name, value in fields.items():
        if name == "outputs":
            request.outputs.extend(value)
        else:
            setattr(request, name, value)
    return request


def as_protobuf_parses(got: pb.InferRequest | InferWithPixels) -> pb.InferRequest:
    """The whole request `deserialize_infer_request` gave: the split message with its pixels put back."""
    if isinstance(got, pb.InferRequest):
        return got
    whole = pb.InferRequest()
    whole.CopyFrom(got.message)
    kind = whole.WhichOneof("input")
    assert kind is not None and not getattr(whole, kind).data  # the split message carries no pixels
    getattr(whole, kind).data = bytes(got.pixels)
    return whole


def same_outcome(raw: bytes) -> None:
    """The deserializer and protobuf agree on `raw`: both refuse it, or both give the same request."""
    try:
        reference = pb.InferRequest.FromString(raw)
    except Exception:  # noqa: BLE001 - whatever protobuf raises, the deserializer must raise too
        with pytest.raises(Exception):  # noqa: B017, PT011
            deserialize_infer_request(raw)
        return
    whole = as_protobuf_parses(deserialize_infer_request(raw))
    assert whole == reference
    assert whole.SerializeToString(deterministic=True) == reference.SerializeToString(deterministic=True)


@pytest.mark.parametrize(
    "request_",
    [
        patches_request(),
        patches_request(seed=1, purpose="probe", accept_billed_answer=True, outputs=["pre_logits"], model="m"),
        kit.image_request(kit.random_images(3, 2), request_id="images"),
        kit.image_request(kit.random_images(2, 3), kit.random_keep(2, 5, 3), counts=torch.tensor([5, 2])),
    ],
    ids=["patches", "patches-every-field", "images", "images-kept"],
)
def test_a_request_as_serialized_is_split_and_its_pixels_stay_in_the_bytes(request_: pb.InferRequest) -> None:
    raw = request_.SerializeToString()
    split = split_pixels(raw)
    assert split is not None
    rest, pixels = split
    kind = request_.WhichOneof("input")
    assert kind is not None
    assert pixels.obj is raw and bytes(pixels) == getattr(request_, kind).data  # a view of the received bytes
    # what protobuf parses is the rest: a few fields and the keep tensors, not the pixels
    assert len(rest) < 200 + request_.keep_indices.ByteSize() + request_.keep_counts.ByteSize()
    got = deserialize_infer_request(raw)
    assert isinstance(got, InferWithPixels) and got.request_id == request_.request_id
    assert as_protobuf_parses(got) == request_


def with_extra(request: pb.InferRequest, extra: bytes) -> bytes:
    return request.SerializeToString() + extra


def float_pixels() -> bytes:
    request = patches_request()
    request.patches.CopyFrom(tensor_to_proto(torch.rand(2, 6, 3, 4, 4)))
    return request.SerializeToString()


def in_shared_memory() -> bytes:
    request = patches_request()
    request.patches.ClearField("data")
    request.patches.shm.name = "maskedkd-x"
    return request.SerializeToString()


def both_data_and_shm() -> bytes:
    request = patches_request()
    request.patches.shm.name = "maskedkd-x"
    return request.SerializeToString()


def second_tensor(field: str, **tensor: Any) -> bytes:
    extra = pb.InferRequest()
    getattr(extra, field).CopyFrom(pb.Tensor(**tensor))
    return with_extra(patches_request(), extra.SerializeToString())  # protobuf merges a field written twice


def inside_the_tensor(**tensor: Any) -> bytes:
    """A request whose one patches field carries `tensor`'s fields a second time (protobuf: the last one wins)."""
    request = patches_request()
    inner = request.patches.SerializeToString() + pb.Tensor(**tensor).SerializeToString()
    request.ClearField("patches")
    return request.SerializeToString() + b"\x22" + _varint(len(inner)) + inner


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    return bytes([*out, value])


OTHER_LAYOUTS = {
    "data twice in the tensor": lambda: inside_the_tensor(data=b"\x07" * 8),
    "dtype twice in the tensor": lambda: inside_the_tensor(dtype="uint8"),
    "float pixels": float_pixels,
    "shared memory": in_shared_memory,
    "data and shm": both_data_and_shm,
    "patches twice": lambda: second_tensor("patches", data=b"\x07" * 8),
    "images after patches": lambda: second_tensor("images", dtype="uint8", shape=[1, 3, 32, 32]),
    "dtype twice": lambda: second_tensor("patches", dtype="float32"),
    "data of another wire type": lambda: b"\x22\x09\x0a\x05uint8\x18\x05",  # patches { dtype: "uint8", data: 5 }
    "no pixels": lambda: pb.InferRequest(request_id="x", purpose="probe").SerializeToString(),
    "a group": lambda: with_extra(patches_request(), b"\x5b\x5c"),  # field 11, start and end group
    "a tag past 32 bits": lambda: with_extra(patches_request(), b"\x9a\x80\x80\x80\x10\x01\x07"),  # 2**32 + data
    "too many fields": lambda: patches_request(outputs=["pre_logits"] * MAX_FIELDS).SerializeToString(),
    "truncated": lambda: patches_request().SerializeToString()[:-3],
}


@pytest.mark.parametrize("make", OTHER_LAYOUTS.values(), ids=OTHER_LAYOUTS.keys())
def test_every_other_layout_is_parsed_whole_by_protobuf(make: Any) -> None:
    raw = make()
    assert split_pixels(raw) is None
    same_outcome(raw)


def test_a_buffer_that_is_not_bytes_is_not_viewed() -> None:
    raw = patches_request().SerializeToString()
    assert split_pixels(bytearray(raw)) is None  # type: ignore[arg-type]  # a view could see later writes


def test_mutated_messages_parse_as_protobuf_parses_them_or_are_refused_alike() -> None:
    """Random damage where the structure is (tags, lengths, the other fields), 3,000 messages: never another request
    than protobuf's, never a request where protobuf refuses, never a refusal where it parses."""
    rng = random.Random(0)
    base = patches_request(batch=1, k=2, purpose="probe", outputs=["pre_logits"]).SerializeToString()
    data = patches_request(batch=1, k=2).patches.data
    start = base.index(data)
    structure = [*range(0, start + 2), *range(start + len(data) - 2, len(base))]
    split_taken = 0
    for _ in range(3000):
        raw = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            at = min(rng.choice(structure), len(raw) - 1)  # an earlier cut may have shortened it
            what = rng.random()
            if what < 0.6:
                raw[at] = rng.randrange(256)
            elif what < 0.8:
                raw.insert(at, rng.randrange(256))
            else:
                del raw[at : at + rng.randint(1, 4)]
        split_taken += split_pixels(bytes(raw)) is not None
        same_outcome(bytes(raw))
    assert split_taken > 500  # the damage left many messages the split takes, and they were checked


def test_a_served_request_arrives_split_and_is_answered_and_billed_as_before(tmp_path: Any, model: Any) -> None:
    ref = kit.Reference(model)
    keep = kit.random_keep(3, 7, 11)
    request = kit.patch_request(kit.patches_of(kit.random_images(3, 11), keep), keep, request_id="in-place")
    with running_server(kit.settings(tmp_path), model=model) as srv:
        received: list[type] = []
        infer = srv.server.service.infer

        async def spy(key: Any, arrived: Any, **kwargs: Any) -> Any:
            received.append(type(arrived))
            return await infer(key, arrived, **kwargs)

        srv.server.service.infer = spy  # type: ignore[method-assign]
        channel, stub = kit.stub(srv.address)
        with channel:
            secret = srv.create_key("alice")
            first = stub.Infer(request, metadata=kit.auth(secret))
            again = stub.Infer(request, metadata=kit.auth(secret))
        rows = kit.ledger_rows(srv.settings.db)
    assert received == [InferWithPixels, InferWithPixels]
    torch.testing.assert_close(kit.logits_of(first), ref.logits(kit.random_images(3, 11), keep), **kit.CLOSE)
    assert again.usage.replayed and torch.equal(kit.logits_of(again), kit.logits_of(first))
    assert len(rows) == 1 and rows[0]["gflops"] == pytest.approx(ref.gflops([7, 7, 7]))


def test_the_model_and_fields_are_checked_before_any_region_is_read(tmp_path: Any, model: Any) -> None:
    """A request naming another model, or a bad request_id, is refused for that, before its `shm` region is looked at
    (the server reads no shared memory here, which would be the other refusal)."""
    request = patches_request()
    request.patches.ClearField("data")
    request.patches.shm.name = "maskedkd-nothing-here"
    with running_server(kit.settings(tmp_path), model=model) as srv:
        channel, stub = kit.stub(srv.address)
        with channel:
            secret = srv.create_key("alice")
            codes = []
            for change in ({"model": "another-model"}, {"request_id": "x" * 1000}):
                bad = pb.InferRequest()
                bad.CopyFrom(request)
                for field, value in change.items():
                    setattr(bad, field, value)
                with pytest.raises(grpc.RpcError) as refused:
                    stub.Infer(bad, metadata=kit.auth(secret))
                codes.append((refused.value.code(), refused.value.details()))
    assert codes[0][0] == grpc.StatusCode.NOT_FOUND and "another-model" in codes[0][1]
    assert codes[1][0] == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in codes[1][1]
