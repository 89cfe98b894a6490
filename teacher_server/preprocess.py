"""Decode and validate an `InferRequest` into normalized kept patches, the one form the batcher runs.

Every problem raises `InvalidRequestError` whose message names the field and the problem, so a client can fix it.
Both inputs end up as patches [B, K, C, P, P]: full images are cut on the teacher's grid and the kept positions
gathered, so requests of either kind batch together.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from maskedkd.codec import TensorDecodeError, proto_to_tensor
from maskedkd.text import clip
from maskedkd.v1 import teacher_pb2 as pb
from teacher_server.errors import InvalidRequestError

PIXEL_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int16, torch.int32, torch.int64)


@dataclass(frozen=True)
class ModelSpec:
    """The geometry and normalization of a served teacher (what requests are validated against)."""

    name: str
    img_size: tuple[int, int]          # H, W
    patch_size: int                    # P
    grid_size: tuple[int, int]         # H // P, W // P
    num_patches: int                   # N
    num_prefix_tokens: int
    num_classes: int
    in_chans: int                      # C
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass
class PreparedInput:
    patches: torch.Tensor       # [B, K, C, P, P] float32, normalized; row b valid up to keep_counts[b]
    keep_indices: torch.Tensor  # [B, K] int64, positions on the teacher grid; padded entries set to 0
    keep_counts: torch.Tensor   # [B] int64 in 1..K

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
            "send uint8 (0..255) or float16/bfloat16/float32 (0..1)")
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
                "(the server applies the teacher's mean/std itself)")
    return x


def _check_batch_size(batch: int, name: str, max_images: int) -> None:
    if batch < 1:
        raise InvalidRequestError(f"{name}: empty batch (0 images)")
    if batch > max_images:
        raise InvalidRequestError(f"{name}: {batch} images exceed max_batch_images={max_images}; split the batch")


def _decode_keep_counts(request: pb.InferRequest, batch: int, k: int, max_elements: int) -> torch.Tensor:
    if not request.HasField("keep_counts"):
        return torch.full((batch,), k, dtype=torch.int64)
    counts = _decode(request.keep_counts, "keep_counts", max_elements)
    if counts.dtype not in INDEX_DTYPES:
        raise InvalidRequestError(f"keep_counts: dtype {str(counts.dtype).removeprefix('torch.')} is not an integer "
                                  "type; send int16, int32 or int64")
    if tuple(counts.shape) != (batch,):
        raise InvalidRequestError(f"keep_counts: shape {clip(list(counts.shape))} must be [B] = [{batch}]")
    counts = counts.to(torch.int64)
    bad = ((counts < 1) | (counts > k)).nonzero()
    if len(bad):
        b = int(bad[0, 0])
        raise InvalidRequestError(
            f"keep_counts[{b}] = {int(counts[b])} disagrees with K = {k} of keep_indices; each count must be in 1..{k}")
    return counts


def _validate_indices(indices: torch.Tensor, counts: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Range and uniqueness of the used entries of each row; padded entries (past the count) become 0."""
    batch, k = indices.shape
    used = torch.arange(k).unsqueeze(0) < counts.unsqueeze(1)  # [B, K]
    out_of_range = used & ((indices < 0) | (indices >= num_patches))
    if bool(out_of_range.any()):
        b, j = (int(v) for v in out_of_range.nonzero()[0])
        raise InvalidRequestError(
            f"keep_indices[{b}, {j}] = {int(indices[b, j])} is out of range: the teacher grid has positions "
            f"0..{num_patches - 1}")
    # Padded entries get distinct sentinels beyond the grid so only real duplicates collide.
    sentinels = num_patches + torch.arange(k).unsqueeze(0).expand(batch, k)
    probe = torch.where(used, indices, sentinels)
    ordered = probe.sort(dim=1).values
    dup = (ordered[:, 1:] == ordered[:, :-1]).nonzero()
    if len(dup):
        b, j = (int(v) for v in dup[0])
        raise InvalidRequestError(f"keep_indices row {b} repeats position {int(ordered[b, j])}; positions in a row "
                                  "must be distinct")
    return torch.where(used, indices, torch.zeros_like(indices))


def _decode_keep_indices(request: pb.InferRequest, batch: int, spec: ModelSpec, max_elements: int,
                         k_expected: int | None) -> torch.Tensor:
    indices = _decode(request.keep_indices, "keep_indices", max_elements)
    if indices.dtype not in INDEX_DTYPES:
        raise InvalidRequestError(f"keep_indices: dtype {str(indices.dtype).removeprefix('torch.')} is not an "
                                  "integer type; send int16, int32 or int64")
    if indices.dim() != 2 or indices.shape[0] != batch:
        raise InvalidRequestError(f"keep_indices: shape {clip(list(indices.shape))} must be [B, K] with B = {batch}")
    k = int(indices.shape[1])
    if k_expected is not None and k != k_expected:
        raise InvalidRequestError(f"keep_indices: K = {k} disagrees with patches, which carry K = {k_expected}")
    if k < 1:
        raise InvalidRequestError("keep_indices: K = 0; keep at least one patch")
    if k > spec.num_patches:
        raise InvalidRequestError(f"keep_indices: K = {k} exceeds the {spec.num_patches} patches of the teacher grid")
    return indices.to(torch.int64)


def _normalize(patches: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """[B, K, C, P, P] 0..1 -> teacher-normalized, in place."""
    mean = torch.tensor(spec.mean, dtype=patches.dtype).view(-1, 1, 1)
    std = torch.tensor(spec.std, dtype=patches.dtype).view(-1, 1, 1)
    return patches.sub_(mean).div_(std)


def images_to_patches(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, C, P, P], patches in row-major grid order."""
    b, c, h, w = images.shape
    p = patch_size
    grid = images.reshape(b, c, h // p, p, w // p, p)          # [B, C, Gh, P, Gw, P]
    return grid.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c, p, p)


def prepare_input(request: pb.InferRequest, spec: ModelSpec, *, max_images: int,
                  max_elements: int = 1 << 31) -> PreparedInput:
    """Validate `request` against the teacher `spec`; returns normalized kept patches or raises InvalidRequestError."""
    which = request.WhichOneof("input")
    p, c = spec.patch_size, spec.in_chans
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
        if tuple(images.shape[2:]) != spec.img_size:
            h, w = spec.img_size
            raise InvalidRequestError(f"images: size {images.shape[2]}x{images.shape[3]}, the teacher expects {h}x{w}")
        pixels = _pixels_to_unit_float(images, "images")
        all_patches = images_to_patches(pixels, p)                 # [B, N, C, P, P]
        if request.HasField("keep_indices"):
            indices = _decode_keep_indices(request, batch, spec, max_elements, None)
        else:
            if request.HasField("keep_counts"):
                raise InvalidRequestError("keep_counts needs keep_indices: without them every image keeps all "
                                          f"{spec.num_patches} patches")
            indices = torch.arange(spec.num_patches).unsqueeze(0).expand(batch, -1).clone()
        k = int(indices.shape[1])
        counts = _decode_keep_counts(request, batch, k, max_elements)
        indices = _validate_indices(indices, counts, spec.num_patches)
        gather = indices.view(batch, k, 1, 1, 1).expand(batch, k, c, p, p)
        patches = torch.gather(all_patches, 1, gather)             # [B, K, C, P, P]
    else:
        raw = _decode(request.patches, "patches", max_elements)
        if raw.dim() != 5:
            raise InvalidRequestError(f"patches: shape {clip(list(raw.shape))} must be [B, K, C, P, P] (5 dimensions)")
        batch, k = int(raw.shape[0]), int(raw.shape[1])
        _check_batch_size(batch, "patches", max_images)
        if raw.shape[2] != c:
            raise InvalidRequestError(f"patches: {raw.shape[2]} channels, the teacher expects {c}")
        if tuple(raw.shape[3:]) != (p, p):
            raise InvalidRequestError(f"patches: patch size {raw.shape[3]}x{raw.shape[4]}, the teacher's patches are "
                                      f"{p}x{p}")
        if not request.HasField("keep_indices"):
            raise InvalidRequestError("keep_indices are required with patches: where on the grid does each patch go?")
        indices = _decode_keep_indices(request, batch, spec, max_elements, k)
        counts = _decode_keep_counts(request, batch, k, max_elements)
        indices = _validate_indices(indices, counts, spec.num_patches)
        patches = _pixels_to_unit_float(raw, "patches")
    return PreparedInput(patches=_normalize(patches.contiguous(), spec), keep_indices=indices, keep_counts=counts)
