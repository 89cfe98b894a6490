"""The tolerant deserializer: bytes upb refuses become an `UndecodableRequest` naming the field, with the request_id
read back where that part is intact; valid bytes decode as usual."""

from __future__ import annotations

import pytest

from maskedkd.v1 import teacher_pb2 as pb
from teacher_server.errors import InvalidRequestError
from teacher_server.service.wire.decoding import UndecodableRequest, decoded, request_id_of, tolerant

pytestmark = pytest.mark.dtype("none")  # no model numerics

deserialize = tolerant(pb.InferRequest.FromString, pb.InferRequest.DESCRIPTOR)
VALID = pb.InferRequest(
    request_id="r-1", model="vit", images=pb.Tensor(dtype="uint8", shape=[1, 3, 2, 2], data=bytes(12))
).SerializeToString()


@pytest.mark.parametrize(
    ("raw", "problem", "request_id"),
    [
        (VALID[:-4], "images: 27 bytes announced at byte 10, only 23 left", "r-1"),
        (VALID.replace(b"uint8", b"uin\xff8"), "images.dtype is not valid UTF-8", "r-1"),
        (VALID.replace(b"r-1", b"r\xc3("), "request_id is not valid UTF-8", ""),
        (b"\x0a\x02ok\x22\x05\x12\x03\xff\xff\xff", "patches.shape: packed values run past their length", "ok"),
        (b"\x0a\x02ok\x0f", "request_id: wire type 7 at byte 4 (no such wire type)", "ok"),
        (b"\x00\x01", "field number 0 at byte 0", ""),
        (b"\x18\x00" * 20_000 + b"\x0b", "Wire format was corrupt", ""),  # past the scan's budget: upb's reason
    ],
    ids=["cut", "utf8_dtype", "utf8_request_id", "packed", "wire_type", "field_zero", "budget"],
)
def test_undecodable_bytes_name_their_problem(raw: bytes, problem: str, request_id: str) -> None:
    marker = deserialize(raw)
    assert isinstance(marker, UndecodableRequest)
    assert (marker.problem, marker.request_id, request_id_of(marker)) == (problem, request_id, request_id)
    with pytest.raises(InvalidRequestError, match=r"not a valid maskedkd\.v1\.InferRequest: "):
        decoded(marker)


def test_valid_bytes_decode_as_usual() -> None:
    request = decoded(deserialize(VALID))
    assert isinstance(request, pb.InferRequest) and request_id_of(request) == "r-1"
    assert list(request.images.shape) == [1, 3, 2, 2]
