"""An InferRequest's pixels read where they arrived: the message is parsed without its input tensor's `data`, and the
pixels are a view of the received bytes.

Through the messages, a request's pixels were copied twice on the event loop before anything was checked: protobuf's
parse copies every bytes field into the message, and each read of `Tensor.data` copies it out again (~7 us an image
each for the 75 KB of a DeiT-S image at keep 50%; docs/performance-notes.md, section 19). `split_pixels` walks the
wire format of the message's top level and of its input tensor only (a few fields). When the message is laid out as
serializers write it (the input tensor once, uint8, its `dtype` and `data` once each, no shared memory region), it
returns the message's bytes without the `data` field, which protobuf then parses as before (every other field is
checked as it always was), and a view of the pixel bytes where they lie. Any other layout (a field written twice,
another dtype, `shm`, a wire type the contract does not use, more fields than a request has) returns None, and
protobuf parses the whole message. Either way the request is the same: protobuf's value of a bytes field written once
is its bytes. uint8 only: a view at any offset is aligned for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from maskedkd.v1 import teacher_pb2 as pb
from teacher_server.service.wire.wire_format import I32, I64, LEN, VARINT, WireFormatError, encoded_varint, read_varint

_INPUT = frozenset({3, 4})  # InferRequest.images, InferRequest.patches: the `input` oneof
_DTYPE, _DATA, _SHM = 1, 3, 4  # Tensor.dtype, Tensor.data, Tensor.shm
MAX_FIELDS = 256  # fields walked per level (a request has ~10; `outputs` repeats a few): more goes to protobuf


@dataclass(frozen=True)
class InferWithPixels:
    """An InferRequest parsed without its input tensor's `data`, and those bytes: a read-only view of the message as
    it was received (it keeps the message alive)."""

    message: pb.InferRequest
    pixels: memoryview

    @property
    def request_id(self) -> str:  # what an error answer on a stream is keyed by (decoding.request_id_of)
        return self.message.request_id


class _Field(NamedTuple):
    number: int
    wire: int
    start: int  # where its tag begins
    value: int  # where its value begins (after the length, for a length-delimited one)
    end: int


class _UnusualLayoutError(Exception):
    """A layout the split does not take: protobuf parses the whole message."""


def _fields(buf: bytes, pos: int, end: int) -> list[_Field]:
    """The fields of `buf[pos:end]`, in order; _UnusualLayoutError for a truncated one, a group, or too many."""
    fields: list[_Field] = []
    while pos < end:
        if len(fields) == MAX_FIELDS:
            raise _UnusualLayoutError
        start = pos
        tag, pos = read_varint(buf, pos, end)
        if tag >> 32:  # no field number protobuf reads the same way: let it judge the message
            raise _UnusualLayoutError
        wire = tag & 7
        value = pos
        if wire == VARINT:
            _, pos = read_varint(buf, pos, end)
        elif wire in (I64, I32):
            pos += 8 if wire == I64 else 4
        elif wire == LEN:
            size, value = read_varint(buf, pos, end)
            pos = value + size
        else:
            raise _UnusualLayoutError
        if pos > end:
            raise _UnusualLayoutError
        fields.append(_Field(tag >> 3, wire, start, value, pos))
    return fields


def _the_one(fields: list[_Field], number: int) -> _Field:
    """The one length-delimited field of `number`; _UnusualLayoutError when absent, repeated or of another wire type."""
    found = [f for f in fields if f.number == number]
    if len(found) != 1 or found[0].wire != LEN:
        raise _UnusualLayoutError
    return found[0]


def split_pixels(raw: bytes) -> tuple[bytes, memoryview] | None:
    """(the message `raw` without its input tensor's `data` field, a view of that field's bytes in `raw`), or None
    when the message is not laid out as the split takes it (see the module's docstring)."""
    if type(raw) is not bytes:  # a view must not see later writes
        return None
    try:
        top = _fields(raw, 0, len(raw))
        inputs = [f for f in top if f.number in _INPUT]
        if len(inputs) != 1 or inputs[0].wire != LEN:
            raise _UnusualLayoutError
        tensor = inputs[0]
        inner = _fields(raw, tensor.value, tensor.end)
        dtype, data = _the_one(inner, _DTYPE), _the_one(inner, _DATA)
        if any(f.number == _SHM for f in inner) or raw[dtype.value : dtype.end] != b"uint8":
            raise _UnusualLayoutError
    except (_UnusualLayoutError, WireFormatError):
        return None
    kept = raw[tensor.value : data.start] + raw[data.end : tensor.end]  # the tensor's dtype and shape
    head = encoded_varint(tensor.number << 3 | LEN) + encoded_varint(len(kept))
    return b"".join((raw[: tensor.start], head, kept, raw[tensor.end :])), memoryview(raw)[data.value : data.end]


def deserialize_infer_request(raw: bytes) -> pb.InferRequest | InferWithPixels:
    """The request in `raw`: with its pixels in place where `split_pixels` takes it, else as protobuf parses it
    (raising as protobuf does on bytes that are not an InferRequest)."""
    split = split_pixels(raw)
    if split is None:
        return pb.InferRequest.FromString(raw)
    rest, pixels = split
    return InferWithPixels(pb.InferRequest.FromString(rest), pixels)
