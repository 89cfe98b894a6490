"""Request bytes that do not parse. grpc would answer UNKNOWN ("Unexpected DecodeError") for a unary call and end a
whole stream; instead a tolerant deserializer turns them into an `UndecodableRequest` marker, which `decoded` (the
one check, for unary calls and stream messages alike) refuses with INVALID_ARGUMENT naming the problem. A stream
answers the marker keyed by the request_id read back from the raw bytes, when that part of them is intact."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from teacher_server.errors import InvalidRequestError
from teacher_server.service.wire.wire_format import I32, I64, LEN, VARINT, WireFormatError, read_varint

SCAN_FIELDS = 10_000  # fields the scan reads before giving up (it runs in Python, on the event loop)
_VARINT_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_BOOL,
        FieldDescriptor.TYPE_ENUM,
    }
)


@dataclass(frozen=True)
class UndecodableRequest:
    """What the deserializer hands on for bytes that are not a valid message."""

    message_type: str  # e.g. "maskedkd.v1.InferRequest"
    problem: str  # one bounded line: which field, which byte
    request_id: str  # read from the raw bytes where possible, else ""

    def error(self) -> InvalidRequestError:
        return InvalidRequestError(f"the request is not a valid {self.message_type}: {self.problem}")


def decoded(request: Any) -> Any:
    """`request` itself, or the INVALID_ARGUMENT error of an undecodable one."""
    if isinstance(request, UndecodableRequest):
        raise request.error()
    return request


def request_id_of(request: Any) -> str:
    """The request_id an answer to `request` is keyed by (also for an undecodable one)."""
    return request.request_id if isinstance(request, UndecodableRequest) else getattr(request, "request_id", "")


def tolerant(deserializer: Callable[[bytes], Any], descriptor: Descriptor) -> Callable[[bytes], Any]:
    """`deserializer` that returns an `UndecodableRequest` instead of raising."""

    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as exc:  # noqa: BLE001 - DecodeError, and whatever else a parser raises on hostile bytes
            scan = _Scan()
            try:
                _scan(raw, 0, len(raw), descriptor, "", scan)
                problem = _parser_says(exc)  # the scan found nothing: say what the parser said
            except _CorruptWireError as corrupt:
                problem = str(corrupt)
            except _ScanGaveUpError:
                problem = _parser_says(exc)
            return UndecodableRequest(descriptor.full_name, problem, scan.request_id)

    return deserialize


def _parser_says(exc: Exception) -> str:
    """upb's reason ("Wire format was corrupt"), without the message type it names first."""
    return str(exc).split(": ")[-1][:120] or type(exc).__name__


class _CorruptWireError(Exception):
    """The first problem found in the wire format, as a bounded message."""


class _ScanGaveUpError(Exception):
    """The scan read SCAN_FIELDS fields without finding the problem."""


@dataclass
class _Scan:
    request_id: str = ""  # the top-level request_id, once read
    fields_left: int = SCAN_FIELDS


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    try:
        return read_varint(buf, pos, len(buf))
    except WireFormatError as exc:
        raise _CorruptWireError(str(exc)) from None


def _scan(buf: bytes, pos: int, end: int, descriptor: Descriptor, path: str, scan: _Scan) -> None:
    """Walk the fields of `buf[pos:end]` as `descriptor`, raising `_CorruptWireError` at the first problem; records the
    top-level request_id on the way."""
    while pos < end:
        scan.fields_left -= 1
        if scan.fields_left < 0:
            raise _ScanGaveUpError
        at = pos
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        field = descriptor.fields_by_number.get(number)
        name = path + (field.name if field is not None else f"field {number}")
        if number == 0:
            raise _CorruptWireError(f"field number 0 at byte {at}")
        if wire == VARINT:
            _, pos = _varint(buf, pos)
        elif wire in (I64, I32):
            pos += 8 if wire == I64 else 4
        elif wire == LEN:
            size, pos = _varint(buf, pos)
            if pos + size > end:
                raise _CorruptWireError(f"{name}: {size} bytes announced at byte {at}, only {end - pos} left")
            if field is not None:
                _check_value(buf, pos, pos + size, field, name, scan, top=not path)
            pos += size
        else:
            what = "a group, which this contract does not use" if wire in (3, 4) else "no such wire type"
            raise _CorruptWireError(f"{name}: wire type {wire} at byte {at} ({what})")
        if pos > end:
            raise _CorruptWireError(f"{name}: truncated at byte {end}")


def _check_value(buf: bytes, pos: int, end: int, field: FieldDescriptor, name: str, scan: _Scan, *, top: bool) -> None:
    if field.type == FieldDescriptor.TYPE_STRING:
        try:
            text = buf[pos:end].decode("utf-8")
        except UnicodeDecodeError:
            raise _CorruptWireError(f"{name} is not valid UTF-8") from None
        if top and field.name == "request_id":
            scan.request_id = text
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        _scan(buf, pos, end, field.message_type, name + ".", scan)
    elif field.type in _VARINT_TYPES:  # packed repeated varints
        while pos < end:
            scan.fields_left -= 1
            if scan.fields_left < 0:
                raise _ScanGaveUpError
            try:
                _, pos = _varint(buf, pos)
            except _CorruptWireError:
                raise _CorruptWireError(f"{name}: packed values run past their length") from None
        if pos > end:
            raise _CorruptWireError(f"{name}: packed values run past their length")
