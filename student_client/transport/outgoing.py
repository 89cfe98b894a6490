"""A teacher request as the client sends it: every field in a protobuf message except the pixels' bytes, which are
kept apart and copied once more only, straight into the serialized request.

Protobuf copies a request's pixels four times on the way out: into the input tensor's message, into the request
(`CopyFrom`), and twice to serialize it (into its arena, then into the bytes gRPC sends). For 64 images of kept
DeiT-S patches (4.8 MB) that was ~150 us of the client's CPU per image with glibc's default allocator, where each copy
into fresh memory faults its pages in (docs/performance-notes.md, section 23). Here the bytes are copied once when the
request is built (so the caller may reuse its tensors, and a retry sends what the first attempt sent) and once into
the serialized request. `serialize` writes the bytes protobuf's own serializer writes for the whole message (fields in
number order), so the server reads them as before, through its in-place path too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from maskedkd.v1 import teacher_pb2 as pb

_INPUT_NUMBERS = {f.name: f.number for f in pb.InferRequest.DESCRIPTOR.oneofs_by_name["input"].fields}
_DATA_NUMBER = pb.Tensor.DESCRIPTOR.fields_by_name["data"].number
_LENGTH_DELIMITED = 2  # protobuf's wire type of bytes and messages
SERVICE = "/maskedkd.v1.TeacherService/"


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _key(number: int) -> bytes:
    """The key of a length-delimited field `number`."""
    return _varint(number << 3 | _LENGTH_DELIMITED)


def copy_field(target: Message, field: FieldDescriptor, value: Any) -> None:
    """Set `field` of `target` to `value` (as `ListFields` gives it)."""
    if field.is_repeated:
        getattr(target, field.name).extend(value)
    elif field.type == field.TYPE_MESSAGE:
        getattr(target, field.name).CopyFrom(value)
    else:
        setattr(target, field.name, value)


@dataclass
class OutgoingRequest:
    """One InferRequest on its way out. With `pixels`, `message` holds the input tensor's dtype and shape but not
    its data; `serialize()` gives the bytes of the whole request, `whole()` the whole request as one message."""

    message: pb.InferRequest  # changed in place by a resend (request_id, accept_billed_answer)
    pixels: bytes | None = None  # the input tensor's `data`; None: the message is whole (data, shm, or no input)

    def __post_init__(self) -> None:
        if self.pixels is None:
            return
        name = self.message.WhichOneof("input")
        tensor = getattr(self.message, name) if name is not None else None
        if tensor is None or tensor.data or tensor.HasField("shm"):
            raise ValueError("pixels kept apart need an input tensor with neither data nor shm")

    @classmethod
    def of(cls, request: OutgoingRequest | pb.InferRequest) -> OutgoingRequest:
        """`request` itself, or a whole InferRequest wrapped (it is not copied)."""
        return request if isinstance(request, OutgoingRequest) else cls(request)

    @property
    def request_id(self) -> str:
        return self.message.request_id

    def serialize(self) -> bytes:
        """The serialized request: `whole().SerializeToString()`, with one copy of the pixels."""
        if self.pixels is None:
            return self.message.SerializeToString()
        name = self.message.WhichOneof("input")
        assert name is not None  # checked at construction
        number = _INPUT_NUMBERS[name]
        below, above = pb.InferRequest(), pb.InferRequest()  # the fields written before and after the input
        for field, value in self.message.ListFields():
            if field.number != number:
                copy_field(below if field.number < number else above, field, value)
        header = getattr(self.message, name).SerializeToString()  # dtype, shape: the fields before `data`
        data_key = _key(_DATA_NUMBER) + _varint(len(self.pixels)) if self.pixels else b""  # proto3 omits empty bytes
        tensor_size = len(header) + len(data_key) + len(self.pixels)
        return b"".join(
            (
                below.SerializeToString(),
                _key(number),
                _varint(tensor_size),
                header,
                data_key,
                self.pixels,
                above.SerializeToString(),
            )
        )

    def whole(self) -> pb.InferRequest:
        """The same request as one message (a copy with the pixels in it; `message` itself when it is whole)."""
        if self.pixels is None:
            return self.message
        out = pb.InferRequest()
        out.CopyFrom(self.message)
        name = out.WhichOneof("input")
        assert name is not None
        getattr(out, name).data = self.pixels
        return out


def serialize_request(request: OutgoingRequest | pb.InferRequest) -> bytes:
    """What the client's stubs put on the wire for an Infer request."""
    return OutgoingRequest.of(request).serialize()


class TeacherStub:
    """`TeacherServiceStub`, with Infer and InferStream taking `OutgoingRequest`s (or whole InferRequests)."""

    def __init__(self, channel: grpc.Channel | grpc.aio.Channel) -> None:
        self.GetModelInfo = channel.unary_unary(
            SERVICE + "GetModelInfo",
            request_serializer=pb.ModelInfoRequest.SerializeToString,
            response_deserializer=pb.ModelInfo.FromString,
            _registered_method=True,
        )
        answer = pb.InferResponse.FromString
        self.Infer = channel.unary_unary(
            SERVICE + "Infer",
            request_serializer=serialize_request,
            response_deserializer=answer,
            _registered_method=True,
        )
        self.InferStream = channel.stream_stream(
            SERVICE + "InferStream",
            request_serializer=serialize_request,
            response_deserializer=answer,
            _registered_method=True,
        )
