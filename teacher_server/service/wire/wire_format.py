"""Protobuf's wire format, as far as the server reads it by hand: the wire types this contract writes, and varints.
Used where the server must look at a message's bytes before (or instead of) protobuf: to name the problem in bytes
that do not parse (decoding.py), and to view a request's pixels where they arrived (pixels_in_place.py)."""

from __future__ import annotations

VARINT, I64, LEN, I32 = 0, 1, 2, 5  # wire types; 3 and 4 (groups) are not in this contract
MAX_VARINT_BYTES = 10


class WireFormatError(ValueError):
    """A varint that runs past its message, or beyond 10 bytes: the message names the byte."""


def read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """(the varint at `buf[pos]`, the position after it), reading no further than `end`."""
    result = shift = 0
    while True:
        if pos >= end:
            raise WireFormatError(f"truncated at byte {pos} (inside a varint)")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 7 * MAX_VARINT_BYTES:
            raise WireFormatError(f"varint longer than {MAX_VARINT_BYTES} bytes ending at byte {pos}")


def encoded_varint(value: int) -> bytes:
    """`value` (>= 0) as a varint."""
    out = bytearray()
    while value > 0x7F:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    out.append(value)
    return bytes(out)
