"""Decode and validate an `InferRequest` into normalized kept patches, the one form the batcher runs.

Every problem raises `InvalidRequestError` whose message names the field and the problem, so a client can fix it.
Both inputs end up as patches [B, K, C, P, P]: full images are cut on the teacher's grid and the kept positions
gathered, so requests of either kind batch together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from maskedkd.codec import TensorDecodeError, proto_to_tensor
from maskedkd.geometry import TeacherGeometry
from maskedkd.keep import KeepIndicesError, check_keep
from maskedkd.patches import gather_patches
from maskedkd.text import clip
from maskedkd.v1 import teacher_pb2 as pb
from teacher_server.errors import InvalidRequestError

PIXEL_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int16, torch.int32, torch.int64)


@dataclass
class PreparedInput:
    patches: torch.Tensor  # [B, K, C, P, P] float32, normalized; row b valid up to keep_counts[b]
    keep_indices: torch.Tensor  # [B, K] int64, positions on the teacher grid; padded entries set to 0
    keep_counts: torch.Tensor  # [B] int64 in 1..K

    @property
    def images(self) -> int:
        return int(self.patches.shape[0])

    @property
    def counts(self) -> list[int]:
        return [int(c) for c in self.keep_counts.tolist()]


def _decode(msg: pb.Tensor, name: str, max_elements: int) -> torch.Tensor:
    try:
        return proto_to_tensor(msg, name=name, max_elements=max_elements)
    except TensorDecodeError as exc:
        raise InvalidRequestError(str(exc)) from exc


def _pixels_to_unit_float(x: torch.Tensor, name: str) -> torch.Tensor:
    """uint8 0..255 or float 0..1 -> float32 0..1."""
    if x.dtype not in PIXEL_DTYPES:
        raise InvalidRequestError(
            f"{name}: dtype {str(x.dtype).removeprefix('torch.')} is not a pixel type; "
            "send uint8 (0..255) or float16/bfloat16/float32 (0..1)"
        )
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    x = x.to(torch.float32)
    if x.numel():
        if not bool(torch.isfinite(x).all()):
            raise InvalidRequestError(f"{name}: float pixels must be finite (found NaN or inf)")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise InvalidRequestError(
                f"{name}: float pixels must be un-normalized in [0, 1], got values in [{lo:.4g}, {hi:.4g}] "
                "(the server applies the teacher's mean/std itself)"
            )
    return x


def _check_batch_size(batch: int, name: str, max_images: int) -> None:
    if batch < 1:
        raise InvalidRequestError(f"{name}: empty batch (0 images)")
    if batch > max_images:
        raise InvalidRequestError(f"{name}: {batch} images exceed max_batch_images={max_images}; split the batch")


def _decode_index_tensor(request: pb.InferRequest, field: str, max_elements: int) -> torch.Tensor:
    """keep_indices / keep_counts as sent, in one of the contract's integer dtypes."""
    x = _decode(getattr(request, field), field, max_elements)
    if x.dtype not in INDEX_DTYPES:
        raise InvalidRequestError(
            f"{field}: dtype {str(x.dtype).removeprefix('torch.')} is not an integer type; send int16, int32 or int64"
        )
    return x


def _checked_keep(
    request: pb.InferRequest, batch: int, geometry: TeacherGeometry, max_elements: int, k_expected: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep_indices [B, K] int64 with padding zeroed, keep_counts [B] int64), checked once (`maskedkd.keep`)."""
    indices = _decode_index_tensor(request, "keep_indices", max_elements)
    counts = _decode_index_tensor(request, "keep_counts", max_elements) if request.HasField("keep_counts") else None
    try:
        indices, counts = check_keep(indices, counts, batch=batch, num_patches=geometry.num_patches)
    except KeepIndicesError as exc:
        raise InvalidRequestError(str(exc)) from exc
    if k_expected is not None and indices.shape[1] != k_expected:
        raise InvalidRequestError(
            f"keep_indices: K = {indices.shape[1]} disagrees with patches, which carry K = {k_expected}"
        )
    return indices, counts


def _normalize(patches: torch.Tensor, geometry: TeacherGeometry) -> torch.Tensor:
    """[B, K, C, P, P] 0..1 -> teacher-normalized, in place."""
    mean = torch.tensor(geometry.mean, dtype=patches.dtype).view(-1, 1, 1)
    std = torch.tensor(geometry.std, dtype=patches.dtype).view(-1, 1, 1)
    return patches.sub_(mean).div_(std)


def prepare_input(
    request: pb.InferRequest, geometry: TeacherGeometry, *, max_images: int, max_elements: int = 1 << 31
) -> PreparedInput:
    """Validate `request` against the teacher's `geometry`; returns normalized kept patches or raises
    InvalidRequestError. The forward trusts what this returned (it checks nothing again)."""
    which = request.WhichOneof("input")
    p, c = geometry.patch_size, geometry.in_chans
    if which is None:
        raise InvalidRequestError("request carries no input: set `images` [B, C, H, W] or `patches` [B, K, C, P, P]")
    if which == "images":
        images = _decode(request.images, "images", max_elements)
        if images.dim() != 4:
            raise InvalidRequestError(f"images: shape {clip(list(images.shape))} must be [B, C, H, W] (4 dimensions)")
        batch = int(images.shape[0])
        _check_batch_size(batch, "images", max_images)
        if images.shape[1] != c:
            raise InvalidRequestError(f"images: {images.shape[1]} channels, the teacher expects {c}")
        if tuple(images.shape[2:]) != geometry.image_size:
            h, w = geometry.image_size
            raise InvalidRequestError(f"images: size {images.shape[2]}x{images.shape[3]}, the teacher expects {h}x{w}")
        pixels = _pixels_to_unit_float(images, "images")
        if request.HasField("keep_indices"):
            indices, counts = _checked_keep(request, batch, geometry, max_elements, None)
        else:
            if request.HasField("keep_counts"):
                raise InvalidRequestError(
                    f"keep_counts needs keep_indices: without them every image keeps all {geometry.num_patches} patches"
                )
            indices = torch.arange(geometry.num_patches).unsqueeze(0).expand(batch, -1).clone()
            counts = torch.full((batch,), geometry.num_patches, dtype=torch.int64)
        patches = gather_patches(pixels, indices, p)  # [B, K, C, P, P]
    else:
        raw = _decode(request.patches, "patches", max_elements)
        if raw.dim() != 5:
            raise InvalidRequestError(f"patches: shape {clip(list(raw.shape))} must be [B, K, C, P, P] (5 dimensions)")
        batch, k = int(raw.shape[0]), int(raw.shape[1])
        _check_batch_size(batch, "patches", max_images)
        if raw.shape[2] != c:
            raise InvalidRequestError(f"patches: {raw.shape[2]} channels, the teacher expects {c}")
        if tuple(raw.shape[3:]) != (p, p):
            raise InvalidRequestError(
                f"patches: patch size {raw.shape[3]}x{raw.shape[4]}, the teacher's patches are {p}x{p}"
            )
        if not request.HasField("keep_indices"):
            raise InvalidRequestError("keep_indices are required with patches: where on the grid does each patch go?")
        indices, counts = _checked_keep(request, batch, geometry, max_elements, k)
        patches = _pixels_to_unit_float(raw, "patches")
    return PreparedInput(patches=_normalize(patches.contiguous(), geometry), keep_indices=indices, keep_counts=counts)
