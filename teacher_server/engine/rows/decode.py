"""Decode and validate an `InferRequest` at the boundary, without copying or converting its pixels.

The pixels stay in the request's own bytes: `torch.frombuffer` views them as sent (uint8 0..255, or float 0..1), and
the staging of the micro-batch (staging.py) copies them once into its reused buffer; the teacher normalizes them
inside its patch projection (`MaskedTeacher.forward_pixels`). Every check happens here, once, and every problem is an
`InvalidRequestError` whose message names the field: the tensors' dtype, shape and byte count (`maskedkd.codec`), the
shapes against the teacher's geometry, keep indices and counts (`maskedkd.keep`), and float pixels finite and in
[0, 1] (a uint8 byte is always a valid pixel, so uint8 pixels cost no pass). Both inputs keep their kind: full images
are cut on the teacher's grid when they are staged, so requests of either kind batch together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch

from maskedkd.codec import WIRE_DTYPES, TensorDecodeError, tensor_view
from maskedkd.geometry import TeacherGeometry
from maskedkd.keep import KeepIndicesError, check_keep
from maskedkd.text import clip
from maskedkd.v1 import teacher_pb2 as pb
from teacher_server.engine.rows.answers import NO_OUTPUTS, OutputsRequest
from teacher_server.errors import InvalidRequestError

PIXEL_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32)
Pixels = bytes | memoryview  # a request's pixel bytes: its own, read out of a region, or viewed where they arrived
INDEX_DTYPES = (torch.int16, torch.int32, torch.int64)


@dataclass(frozen=True)
class DecodedInput:
    """One request's input, checked: what the micro-batch stages and the meter prices."""

    kind: Literal["patches", "images"]
    pixels: torch.Tensor  # patches [B, K, C, P, P] or images [B, C, H, W], a view of the request's bytes as sent
    keep_indices: torch.Tensor  # [B, K] int64 positions on the teacher grid; padded entries 0
    keep_counts: torch.Tensor  # [B] int64 in 1..K: row b uses its first keep_counts[b] positions
    payload: Pixels  # the pixel bytes of the request (the digest reads them; `pixels` views them)
    outputs: OutputsRequest = NO_OUTPUTS  # extra outputs asked for (answers.decode_outputs)

    @property
    def images(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def k(self) -> int:
        """Positions per row (the widest row's count)."""
        return int(self.keep_indices.shape[1])

    @property
    def counts(self) -> list[int]:
        return [int(c) for c in self.keep_counts.tolist()]

    def rows(self, start: int, stop: int) -> DecodedInput:
        """Images `start:stop` of this input (views; the payload stays the whole request's, for its digest)."""
        part = slice(start, stop)
        return replace(
            self, pixels=self.pixels[part], keep_indices=self.keep_indices[part], keep_counts=self.keep_counts[part]
        )

    @property
    def raw_scale(self) -> bool:
        """True when the pixels are on the 0..255 scale the teacher's raw projection takes (uint8)."""
        return self.pixels.dtype == torch.uint8


def _view(msg: pb.Tensor, name: str, max_elements: int, data: Pixels | None = None) -> tuple[torch.Tensor, Pixels]:
    """(the tensor viewing the message's bytes, or `data` read from its shared memory region, those bytes);
    InvalidRequestError naming `name` when they are bad."""
    if data is None:
        if msg.HasField("shm"):
            raise InvalidRequestError(f"{name}: shared memory (shm) carries only the pixels; send {name}.data")
        data = msg.data  # one read of the field: every access copies it out of the message
    try:  # read-only bytes: nothing here writes into them
        return tensor_view(msg, data, name=name, max_elements=max_elements), data
    except TensorDecodeError as exc:
        raise InvalidRequestError(str(exc)) from exc


def _check_float_pixels(x: torch.Tensor, name: str) -> None:
    """Float pixels must be finite and un-normalized in [0, 1] (one pass; uint8 needs none)."""
    if x.dtype not in PIXEL_DTYPES:
        raise InvalidRequestError(
            f"{name}: dtype {str(x.dtype).removeprefix('torch.')} is not a pixel type; "
            "send uint8 (0..255) or float16/bfloat16/float32 (0..1)"
        )
    if x.dtype == torch.uint8 or not x.numel():
        return
    if not bool(torch.isfinite(x).all()):
        raise InvalidRequestError(f"{name}: float pixels must be finite (found NaN or inf)")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise InvalidRequestError(
            f"{name}: float pixels must be un-normalized in [0, 1], got values in [{lo:.4g}, {hi:.4g}] "
            "(the server applies the teacher's mean/std itself)"
        )


def _check_batch_size(batch: int, name: str, max_images: int) -> None:
    if batch < 1:
        raise InvalidRequestError(f"{name}: empty batch (0 images)")
    if batch > max_images:
        raise InvalidRequestError(f"{name}: {batch} images exceed max_batch_images={max_images}; split the batch")


def _index_tensor(request: pb.InferRequest, field: str, max_elements: int) -> torch.Tensor:
    """keep_indices / keep_counts as sent, in one of the contract's integer dtypes."""
    x, _ = _view(getattr(request, field), field, max_elements)
    if x.dtype not in INDEX_DTYPES:
        raise InvalidRequestError(
            f"{field}: dtype {str(x.dtype).removeprefix('torch.')} is not an integer type; send int16, int32 or int64"
        )
    return x


def _checked_keep(
    request: pb.InferRequest, batch: int, geometry: TeacherGeometry, max_elements: int, k_expected: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep_indices [B, K] int64 with padding zeroed, keep_counts [B] int64), checked once (`maskedkd.keep`)."""
    indices = _index_tensor(request, "keep_indices", max_elements)
    counts = _index_tensor(request, "keep_counts", max_elements) if request.HasField("keep_counts") else None
    try:
        indices, counts = check_keep(indices, counts, batch=batch, num_patches=geometry.num_patches)
    except KeepIndicesError as exc:
        raise InvalidRequestError(str(exc)) from exc
    if k_expected is not None and indices.shape[1] != k_expected:
        raise InvalidRequestError(
            f"keep_indices: K = {indices.shape[1]} disagrees with patches, which carry K = {k_expected}"
        )
    return indices, counts


def declared_bytes(request: pb.InferRequest) -> int:
    """The pixel bytes the request's input declares (its shape times its dtype's size), read without touching the
    bytes; 0 when it has no input or names no known dtype (decode_input refuses those)."""
    which = request.WhichOneof("input")
    if which is None:
        return 0
    msg = getattr(request, which)
    dtype = WIRE_DTYPES.get(msg.dtype)
    return 0 if dtype is None else math.prod(msg.shape) * dtype.itemsize


def decode_input(
    request: pb.InferRequest,
    geometry: TeacherGeometry,
    *,
    max_images: int,
    max_elements: int = 1 << 31,
    pixel_bytes: Pixels | None = None,
) -> DecodedInput:
    """Check `request` against the teacher's `geometry` and view its pixels; InvalidRequestError names what is wrong.
    `pixel_bytes`: the pixels read from the shared memory region the input names (service/wire/shared_memory.py), or
    viewed where the message arrived, parsed without them (service/wire/pixels_in_place.py).
    What this returns is trusted from here on (the forward checks nothing again)."""
    which = request.WhichOneof("input")
    p, c = geometry.patch_size, geometry.in_chans
    if which is None:
        raise InvalidRequestError("request carries no input: set `images` [B, C, H, W] or `patches` [B, K, C, P, P]")
    if which == "images":
        images, payload = _view(request.images, "images", max_elements, pixel_bytes)
        if images.dim() != 4:
            raise InvalidRequestError(f"images: shape {clip(list(images.shape))} must be [B, C, H, W] (4 dimensions)")
        batch = int(images.shape[0])
        _check_batch_size(batch, "images", max_images)
        if images.shape[1] != c:
            raise InvalidRequestError(f"images: {images.shape[1]} channels, the teacher expects {c}")
        if tuple(images.shape[2:]) != geometry.image_size:
            h, w = geometry.image_size
            raise InvalidRequestError(f"images: size {images.shape[2]}x{images.shape[3]}, the teacher expects {h}x{w}")
        _check_float_pixels(images, "images")
        if request.HasField("keep_indices"):
            indices, counts = _checked_keep(request, batch, geometry, max_elements, None)
        else:
            if request.HasField("keep_counts"):
                raise InvalidRequestError(
                    f"keep_counts needs keep_indices: without them every image keeps all {geometry.num_patches} patches"
                )
            indices = torch.arange(geometry.num_patches).unsqueeze(0).expand(batch, -1)
            counts = torch.full((batch,), geometry.num_patches, dtype=torch.int64)
        return DecodedInput("images", images, indices, counts, payload)
    patches, payload = _view(request.patches, "patches", max_elements, pixel_bytes)
    if patches.dim() != 5:
        raise InvalidRequestError(f"patches: shape {clip(list(patches.shape))} must be [B, K, C, P, P] (5 dimensions)")
    batch, k = int(patches.shape[0]), int(patches.shape[1])
    _check_batch_size(batch, "patches", max_images)
    if patches.shape[2] != c:
        raise InvalidRequestError(f"patches: {patches.shape[2]} channels, the teacher expects {c}")
    if tuple(patches.shape[3:]) != (p, p):
        raise InvalidRequestError(
            f"patches: patch size {patches.shape[3]}x{patches.shape[4]}, the teacher's patches are {p}x{p}"
        )
    if not request.HasField("keep_indices"):
        raise InvalidRequestError("keep_indices are required with patches: where on the grid does each patch go?")
    indices, counts = _checked_keep(request, batch, geometry, max_elements, k)
    _check_float_pixels(patches, "patches")
    return DecodedInput("patches", patches, indices, counts, payload)
