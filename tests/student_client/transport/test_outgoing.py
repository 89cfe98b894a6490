"""The client's requests as they leave (student_client/transport/outgoing.py): the pixels' bytes kept out of the message
and written once into the serialized request, which must be byte for byte what protobuf serializes for the whole request
built the plain way (every tensor through `tensor_to_proto`, the message serialized by protobuf)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from student_testkit import TINY_INFO

from maskedkd.codec import tensor_to_proto
from maskedkd.v1 import teacher_pb2 as pb
from student_client.transport.outgoing import OutgoingRequest, serialize_request
from student_client.transport.resend import ResendPlan
from student_client.transport.wire import build_request, wire_pixels

pytestmark = pytest.mark.dtype("none")  # request bytes on the CPU: uint8 pixels, float16 where they are not k/255

INFO = dataclasses.replace(TINY_INFO, outputs=("pre_logits", "patch_tokens"))


def _images(b: int, seed: int, *, exact: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, 3, 32, 32), generator=g).float() / 255  # exactly k/255: sent as uint8
    return x if exact else x * 0.7 + 0.1  # not k/255 (as after mixup): sent as float16


def _plain(
    images: torch.Tensor,
    keep: torch.Tensor | None,
    counts: torch.Tensor | None,
    *,
    send_patches: bool,
    request_id: str,
    **fields: object,
) -> pb.InferRequest:
    """The same request built without OutgoingRequest: the kept patches cut here, every tensor a whole message."""
    req = pb.InferRequest(request_id=request_id, **fields)  # type: ignore[arg-type]
    pixels = wire_pixels(images)
    if keep is not None and send_patches:
        grid = pixels.unfold(2, 4, 4).unfold(3, 4, 4)  # [B, C, 8, 8, P, P]
        rows = [grid[b].permute(1, 2, 0, 3, 4).reshape(64, 3, 4, 4)[keep[b]] for b in range(len(keep))]
        req.patches.CopyFrom(tensor_to_proto(torch.stack(rows)))
    else:
        req.images.CopyFrom(tensor_to_proto(pixels))
    if keep is not None:
        req.keep_indices.CopyFrom(tensor_to_proto(keep.to(torch.int16)))
    if counts is not None:
        req.keep_counts.CopyFrom(tensor_to_proto(counts.to(torch.int32)))
    return req


CASES = [
    (exact, layout, ragged, fields)
    for exact, layout, ragged, fields in itertools.product(
        (True, False),  # pixels exactly k/255 (uint8) or not (float16)
        ("patches", "images and keep", "images"),
        (False, True),  # ragged rows (keep_counts)
        ({}, {"model": "tiny", "purpose": "probe", "outputs": ["pre_logits"], "outputs_dtype": "served"}),
    )
    if not (layout == "images" and ragged)  # keep_counts need keep_indices
]


@pytest.mark.parametrize(("exact", "layout", "ragged", "fields"), CASES)
def test_serialized_request_is_protobufs_bytes_of_the_whole_request(
    exact: bool, layout: str, ragged: bool, fields: dict[str, object]
) -> None:
    b = 3
    images = _images(b, seed=len(fields) + 2 * ragged, exact=exact)
    g = torch.Generator().manual_seed(7)
    keep = None if layout == "images" else torch.stack([torch.randperm(64, generator=g)[:20] for _ in range(b)])
    counts = torch.tensor([20, 5, 13]) if ragged else None
    if counts is not None and keep is not None:
        keep = torch.where(torch.arange(20) < counts[:, None], keep, 0)  # padding is 0, as check_keep sets it
    send_patches = layout == "patches"
    rid = "é-" + "r" * 200  # non-ASCII, and long enough for a two-byte length
    built = build_request(
        INFO,
        images=images,
        keep_indices=keep,
        keep_counts=counts,
        request_id=rid,
        send_patches=send_patches,
        **fields,  # type: ignore[arg-type]
    )
    plain = _plain(images, keep, counts, send_patches=send_patches, request_id=rid, **fields)
    assert built.pixels is not None and not getattr(built.message, built.message.WhichOneof("input")).data
    assert built.serialize() == plain.SerializeToString()
    assert serialize_request(built) == serialize_request(plain) == plain.SerializeToString()
    assert built.whole() == plain and pb.InferRequest.FromString(built.serialize()) == plain


def test_a_resend_changes_the_fields_around_the_pixels() -> None:
    """request_id (before the input) and accept_billed_answer (after it) as a refused replay changes them."""
    images, keep = _images(2, seed=1, exact=True), torch.stack([torch.randperm(64)[:16] for _ in range(2)])
    built = build_request(INFO, images=images, keep_indices=keep, request_id="run-e0-s3")
    plan = ResendPlan(built, reuse_billed=True)
    for _ in range(2):
        plain = _plain(images, keep, None, send_patches=True, request_id=built.request_id)
        plain.accept_billed_answer = built.message.accept_billed_answer
        assert built.serialize() == plain.SerializeToString()
        plan.after(_refused())
    assert built.request_id == "run-e0-s3.r1" and not built.message.accept_billed_answer


def _refused() -> Exception:
    from student_client.errors import TeacherError

    return TeacherError("request_id was already used with different inputs", code="ALREADY_EXISTS")


def test_the_request_keeps_the_bytes_it_was_built_with() -> None:
    """uint8 patches are sent as the caller's own tensor's bytes: the request copies them when it is built, so a
    caller that reuses its buffer for the next batch cannot change what a retry of this one sends."""
    g = torch.Generator().manual_seed(3)
    patches = torch.randint(0, 256, (2, 16, 3, 4, 4), dtype=torch.uint8, generator=g)
    keep = torch.stack([torch.randperm(64, generator=g)[:16] for _ in range(2)])
    built = build_request(INFO, patches=patches, keep_indices=keep, request_id="r")
    sent = built.serialize()
    patches.add_(1)  # the caller's next batch, in the same tensor
    assert built.serialize() == sent
    assert built.whole().patches.data == (patches - 1).numpy().tobytes()


def test_a_whole_message_is_sent_as_it_is() -> None:
    req = pb.InferRequest(request_id="x", images=tensor_to_proto(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)))
    wrapped = OutgoingRequest.of(req)
    assert wrapped.message is req and wrapped.whole() is req and wrapped.serialize() == req.SerializeToString()
    assert OutgoingRequest.of(wrapped) is wrapped
    with pytest.raises(ValueError, match="neither data nor shm"):
        OutgoingRequest(req, b"\0" * 3072)  # the message has its bytes already
    with pytest.raises(ValueError, match="neither data nor shm"):
        OutgoingRequest(pb.InferRequest(request_id="x"), b"")  # no input tensor to put them in
