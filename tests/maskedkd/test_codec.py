"""`maskedkd.codec`: Tensor message <-> torch, checked against numpy's explicit little-endian encoding."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from maskedkd.codec import WIRE_DTYPES, TensorDecodeError, proto_to_tensor, tensor_to_proto, tensor_view
from maskedkd.v1 import teacher_pb2 as pb

pytestmark = pytest.mark.dtype("none")  # no model numerics

NUMPY_LE = {"uint8": "<u1", "int16": "<i2", "int32": "<i4", "int64": "<i8", "float16": "<f2", "float32": "<f4"}


def _sample(dtype: torch.dtype, shape: tuple[int, ...] = (2, 3, 4)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        values = torch.randn(shape, generator=g) * 100
        values.view(-1)[:3] = torch.tensor([0.0, -0.0, float("inf")])[: values.numel()]
        return values.to(dtype)
    info = torch.iinfo(dtype)
    values = torch.randint(max(info.min, -(2**31)), min(info.max, 2**31 - 1), shape, generator=g, dtype=torch.int64)
    values.view(-1)[:2] = torch.tensor([info.min, info.max])[: values.numel()]  # extremes of the type
    return values.to(dtype)


def test_wire_dtypes_are_the_contract() -> None:
    assert set(WIRE_DTYPES) == {"uint8", "int16", "int32", "int64", "float16", "bfloat16", "float32"}


@pytest.mark.parametrize("name", sorted(WIRE_DTYPES))
@pytest.mark.parametrize("shape", [(2, 3, 4), (), (0, 5), (1,)])
def test_round_trip_is_bit_exact(name: str, shape: tuple[int, ...]) -> None:
    original = _sample(WIRE_DTYPES[name], shape)
    msg = pb.Tensor.FromString(tensor_to_proto(original).SerializeToString())  # through the wire format
    assert msg.dtype == name and list(msg.shape) == list(shape)
    decoded = proto_to_tensor(msg)
    assert decoded.dtype == original.dtype and decoded.shape == original.shape
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[original.element_size()]
    assert torch.equal(decoded.view(bits), original.view(bits))  # bitwise: -0.0 and inf survive


def test_views_of_read_only_bytes_warn_nothing() -> None:
    # The views of request bytes run with no catch_warnings around them: torch's one warning was spent at import.
    data = tensor_to_proto(_sample(torch.int16)).data  # bytes: read-only
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            view = tensor_view(pb.Tensor(dtype="int16", shape=[2, 3, 4], data=data))
    assert [str(w.message) for w in caught] == []
    assert torch.equal(view, _sample(torch.int16))


def test_nan_survives() -> None:
    original = torch.tensor([float("nan"), 1.0], dtype=torch.bfloat16)
    decoded = proto_to_tensor(tensor_to_proto(original))
    assert torch.equal(decoded.view(torch.int16), original.view(torch.int16))


@pytest.mark.parametrize("name", sorted(NUMPY_LE))
def test_bytes_are_little_endian_row_major(name: str) -> None:
    original = _sample(WIRE_DTYPES[name])
    expected = np.ascontiguousarray(original.numpy(), dtype=np.dtype(NUMPY_LE[name])).tobytes(order="C")
    assert tensor_to_proto(original).data == expected
    # and a buffer written independently by numpy decodes to the same values
    crafted = pb.Tensor(dtype=name, shape=list(original.shape), data=expected)
    assert torch.equal(proto_to_tensor(crafted), original)


def test_known_bytes() -> None:
    assert tensor_to_proto(torch.tensor([1], dtype=torch.int32)).data == b"\x01\x00\x00\x00"
    assert tensor_to_proto(torch.tensor([1.0], dtype=torch.float32)).data == b"\x00\x00\x80\x3f"
    assert tensor_to_proto(torch.tensor([1.0], dtype=torch.bfloat16)).data == b"\x80\x3f"  # 0x3F80
    big_endian_one = pb.Tensor(dtype="int32", shape=[1], data=np.array([1], dtype=">i4").tobytes())
    assert proto_to_tensor(big_endian_one).item() == 1 << 24  # bytes are read as little-endian, never as native


def test_bfloat16_bytes_are_the_high_half_of_float32() -> None:
    # bfloat16 is float32 with the low 16 mantissa bits dropped; these values are exact in both.
    values = [1.0, -2.5, 3.140625, 0.0, -0.0, 65280.0, 2.0**-20]
    f32 = np.array(values, dtype="<f4").tobytes()
    expected = b"".join(f32[i + 2 : i + 4] for i in range(0, len(f32), 4))
    msg = tensor_to_proto(torch.tensor(values, dtype=torch.bfloat16))
    assert msg.data == expected
    decoded = proto_to_tensor(pb.Tensor(dtype="bfloat16", shape=[len(values)], data=expected))
    assert decoded.float().tolist() == values


def test_non_contiguous_tensor_is_sent_in_logical_row_major_order() -> None:
    base = torch.arange(12, dtype=torch.int16).reshape(3, 4)
    transposed = base.t()  # [4, 3], a non-contiguous view
    msg = tensor_to_proto(transposed)
    assert list(msg.shape) == [4, 3]
    assert msg.data == np.ascontiguousarray(base.numpy().T, dtype="<i2").tobytes()
    assert torch.equal(proto_to_tensor(msg), transposed)


def test_decoded_tensor_is_writable_and_owns_its_memory() -> None:
    msg = tensor_to_proto(torch.zeros(4, dtype=torch.float32))
    decoded = proto_to_tensor(msg)
    decoded += 1
    assert proto_to_tensor(msg).sum().item() == 0.0


@pytest.mark.parametrize(
    "msg, fragments",
    [
        (pb.Tensor(dtype="float32", shape=[2, 2], data=b"\x00" * 15), ["images", "needs 16 bytes", "got 15"]),
        (pb.Tensor(dtype="int64", shape=[2], data=b"\x00" * 17), ["images", "needs 16 bytes", "got 17"]),
        (pb.Tensor(dtype="float64", shape=[1], data=b"\x00" * 8), ["images", "unsupported dtype 'float64'"]),
        (pb.Tensor(dtype="", shape=[1], data=b"\x00"), ["images", "unsupported dtype ''"]),
        (pb.Tensor(dtype="FLOAT32", shape=[1], data=b"\x00" * 4), ["unsupported dtype 'FLOAT32'"]),
        (pb.Tensor(dtype="uint8", shape=[2, -3], data=b""), ["images", "negative dimension", "[2, -3]"]),
    ],
    ids=["short", "long", "float64", "empty_dtype", "case", "negative_shape"],
)
def test_bad_messages_raise_tensor_decode_error(msg: pb.Tensor, fragments: list[str]) -> None:
    with pytest.raises(TensorDecodeError) as err:
        proto_to_tensor(msg, name="images")
    assert isinstance(err.value, ValueError)
    assert all(f in str(err.value) for f in fragments), str(err.value)
    assert "\n" not in str(err.value)


def test_max_elements() -> None:
    msg = tensor_to_proto(torch.zeros(3, 4, dtype=torch.uint8))
    assert proto_to_tensor(msg, max_elements=12).shape == (3, 4)
    with pytest.raises(TensorDecodeError, match=r"patches: 12 elements exceed the limit of 11"):
        proto_to_tensor(msg, name="patches", max_elements=11)
    # The limit is checked from the shape before the byte count: a huge declared shape is refused cheaply.
    huge = pb.Tensor(dtype="float32", shape=[1 << 20, 1 << 20], data=b"")
    with pytest.raises(TensorDecodeError, match="exceed the limit"):
        proto_to_tensor(huge, max_elements=1 << 24)


def test_unsupported_torch_dtype_is_refused_on_encode() -> None:
    with pytest.raises(TypeError, match="float64"):
        tensor_to_proto(torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize(
    ("shape", "words"),
    [
        ([1] * 65, "65 dimensions; at most 16"),
        ([0] + [1 << 40] * 3, "zero-size shape"),
        ([1 << 62] * 16, "elements exceed the limit"),
    ],
    ids=["65_dims", "zero_size_huge", "huge"],
)
def test_hostile_shapes_are_refused_before_numpy_sees_them(shape: list[int], words: str) -> None:
    with pytest.raises(TensorDecodeError) as err:
        proto_to_tensor(pb.Tensor(dtype="uint8", shape=shape, data=b""), name="images")
    assert words in str(err.value) and len(str(err.value)) <= 200, str(err.value)


def test_a_long_dtype_is_named_not_echoed() -> None:
    with pytest.raises(TensorDecodeError) as err:
        proto_to_tensor(pb.Tensor(dtype="x" * 5000, shape=[1], data=b"\x00"))
    assert "(5000 chars)" in str(err.value) and len(str(err.value)) <= 200
