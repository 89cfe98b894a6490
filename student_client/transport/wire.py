"""What travels to and from the teacher: ModelInfo/Usage as dataclasses, request building, response decoding.

Shared by the blocking client, the asyncio client and the streaming session, so all three send the same bytes.
"""

from __future__ import annotations

import functools
import inspect
import math
import uuid
from collections.abc import Callable, Iterator
from dataclasses import KW_ONLY, asdict, dataclass, field, fields
from typing import Concatenate, ParamSpec, TypeVar

import torch
import torch.nn.functional as F

from maskedkd.codec import OUTPUT_FIELDS, proto_to_tensor, tensor_bytes, tensor_header, tensor_to_proto
from maskedkd.geometry import TeacherGeometry
from maskedkd.keep import KeepIndicesError, check_keep
from maskedkd.patches import gather_patches
from maskedkd.purpose import purpose_problem
from maskedkd.teacher_outputs import OUTPUT_NAMES
from maskedkd.v1 import teacher_pb2 as pb
from student_client.errors import TeacherInputError
from student_client.transport.off_thread import to_host
from student_client.transport.outgoing import OutgoingRequest

P = ParamSpec("P")
A = TypeVar("A")
S = TypeVar("S")
R = TypeVar("R")


@dataclass(frozen=True)
class ModelInfo(TeacherGeometry):
    """A served teacher, as `GetModelInfo` describes it: its geometry (image/patch size, grid, classes, mean/std)
    and what the service says about it."""

    model: str  # name the server serves it under
    full_gflops: float  # one full, unmasked image
    price_per_gflop: float
    currency: str
    models: tuple[str, ...] = ()  # every model the server serves
    max_batch_images: int = 0  # 0: the server did not say
    dtype: str = "float32"
    outputs: tuple[str, ...] = ()  # the extra outputs it can answer (`Batch.outputs`)
    tome_r: int = 0  # > 0: the teacher merges this many tokens per block (ToMe) instead of masking
    shared_memory: bool = False  # it reads pixels from shared memory of callers on its host (shared_pixels.py)

    @classmethod
    def from_proto(cls, msg: pb.ModelInfo) -> ModelInfo:
        return cls(
            **asdict(TeacherGeometry.from_proto(msg)),
            model=msg.model,
            full_gflops=float(msg.full_gflops),
            price_per_gflop=float(msg.price_per_gflop),
            currency=msg.currency,
            models=tuple(msg.models),
            max_batch_images=int(msg.max_batch_images),
            dtype=msg.dtype or "float32",
            outputs=tuple(msg.outputs),
            tome_r=int(msg.tome_r),
            shared_memory=bool(msg.shared_memory),
        )


@dataclass
class Usage:
    """What one or more requests cost; `+` sums them (replayed is true only if every part was replayed)."""

    images: int = 0
    tokens: int = 0
    gflops: float = 0.0
    full_gflops: float = 0.0
    cost: float = 0.0
    replayed: bool = False
    requests: int = field(default=0, compare=False)  # how many responses this sums
    output_bytes: int = 0  # bytes of the tensors answered (logits and extra outputs)

    @property
    def saved_gflops(self) -> float:
        return self.full_gflops - self.gflops

    @property
    def saving(self) -> float:
        """Fraction of the full teacher's FLOPs not spent (0 when nothing was sent)."""
        return self.saved_gflops / self.full_gflops if self.full_gflops > 0 else 0.0

    @classmethod
    def from_proto(cls, msg: pb.Usage) -> Usage:
        return cls(
            images=int(msg.images),
            tokens=int(msg.tokens),
            gflops=float(msg.gflops),
            full_gflops=float(msg.full_gflops),
            cost=float(msg.cost),
            replayed=bool(msg.replayed),
            requests=1,
            output_bytes=int(msg.output_bytes),
        )

    def __add__(self, other: Usage) -> Usage:
        if self.requests == 0:
            return Usage(**{f.name: getattr(other, f.name) for f in fields(other)})
        if other.requests == 0:
            return self
        return Usage(
            images=self.images + other.images,
            tokens=self.tokens + other.tokens,
            gflops=self.gflops + other.gflops,
            full_gflops=self.full_gflops + other.full_gflops,
            cost=self.cost + other.cost,
            replayed=self.replayed and other.replayed,
            requests=self.requests + other.requests,
            output_bytes=self.output_bytes + other.output_bytes,
        )


def new_request_id() -> str:
    return uuid.uuid4().hex


def wire_pixels(x: torch.Tensor) -> torch.Tensor:
    """uint8 when every value is exactly k/255 in [0, 1] (4x fewer bytes than float32, lossless), else float16.

    The check is one elementwise pass; ToTensor() output and RandAugment'ed pixels qualify, mixup/resize do not.
    """
    if x.dtype == torch.uint8:
        return x
    if not x.is_floating_point():
        raise TeacherInputError(f"pixels must be uint8 or float in [0, 1], got {x.dtype}")
    scaled = x.detach().float() * 255.0
    rounded = scaled.round()
    if x.numel() and bool(((scaled - rounded).abs().amax() <= 1e-3) & (rounded.amin() >= 0) & (rounded.amax() <= 255)):
        return rounded.to(torch.uint8)
    return x.detach().to(torch.float16)


def to_teacher_resolution(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, C, h, w] -> [B, C, H, W] float 0..1, bilinear (App. B), or unchanged when the size already matches."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False).clamp_(0.0, 1.0)


def _index_dtype(num_patches: int) -> torch.dtype:
    return torch.int16 if num_patches <= 32767 else torch.int32


def build_request(
    info: ModelInfo,
    *,
    images: torch.Tensor | None = None,
    patches: torch.Tensor | None = None,
    keep_indices: torch.Tensor | None = None,
    keep_counts: torch.Tensor | None = None,
    request_id: str,
    model: str | None = None,
    send_patches: bool = True,
    purpose: str = "",
    outputs: tuple[str, ...] = (),
    outputs_dtype: str = "",
) -> OutgoingRequest:
    """The InferRequest for one batch, its pixels' bytes kept apart (`OutgoingRequest`). With images + keep_indices
    and `send_patches`, only the kept patches go. `purpose` labels it for the teacher's cost reports ('' = training
    targets, "probe", ...); `outputs` asks for extra outputs (`Batch.outputs`)."""
    if (images is None) == (patches is None):
        raise TeacherInputError("pass exactly one of images or patches")
    if (problem := purpose_problem(purpose)) is not None:
        raise TeacherInputError(problem)
    check_outputs(info, outputs, outputs_dtype)
    req = pb.InferRequest(
        request_id=request_id, model=model or "", purpose=purpose, outputs=list(outputs), outputs_dtype=outputs_dtype
    )
    batch = batch_size_of(images, patches)
    if keep_indices is not None:  # checked here, at the client's boundary (the server checks its own again)
        try:
            keep_indices, checked_counts = check_keep(
                keep_indices, keep_counts, batch=batch, num_patches=info.num_patches
            )  # padding set to 0
        except KeepIndicesError as exc:
            raise TeacherInputError(str(exc)) from exc
        keep_counts = checked_counts if keep_counts is not None else None
    elif keep_counts is not None:
        raise TeacherInputError("keep_counts need keep_indices")
    if images is not None:
        if images.dim() != 4:
            raise TeacherInputError(f"images must be [B, C, H, W], got {list(images.shape)}")
        if images.shape[1] != info.in_chans:
            raise TeacherInputError(f"images have {images.shape[1]} channels; the teacher expects {info.in_chans}")
        images = to_teacher_resolution(images, info.image_size)  # [B, C, H_t, W_t]
        if keep_indices is not None and send_patches:
            patches = gather_patches(images, keep_indices, info.patch_size)  # [B, K, C, P, P]
            pixels = _pixels_into(req.patches, patches)
        else:
            pixels = _pixels_into(req.images, images)
    else:
        assert patches is not None
        if keep_indices is None:
            raise TeacherInputError("keep_indices are required with patches")
        if patches.dim() != 5:
            raise TeacherInputError(f"patches must be [B, K, C, P, P], got {list(patches.shape)}")
        pixels = _pixels_into(req.patches, patches)
    if keep_indices is not None:
        req.keep_indices.CopyFrom(tensor_to_proto(keep_indices.to(_index_dtype(info.num_patches))))
    if keep_counts is not None:
        req.keep_counts.CopyFrom(tensor_to_proto(keep_counts.detach().reshape(-1).to(torch.int32)))
    return OutgoingRequest(req, pixels)


def _pixels_into(tensor: pb.Tensor, pixels: torch.Tensor) -> bytes:
    """Set the input `tensor`'s dtype and shape for `pixels` (uint8, else float16: `wire_pixels`); returns their
    bytes, copied once from the host (the caller's tensor may change afterwards; a retry sends these)."""
    host = to_host(wire_pixels(pixels))
    tensor.CopyFrom(tensor_header(host))
    return tensor_bytes(host)


def check_outputs(info: ModelInfo, outputs: tuple[str, ...], outputs_dtype: str) -> None:
    """TeacherInputError unless the served model can answer `outputs` in `outputs_dtype`."""
    if isinstance(outputs, str):
        raise TeacherInputError(f"outputs must be a sequence of names, got the string {outputs!r}")
    if unknown := [o for o in outputs if o not in OUTPUT_NAMES]:
        raise TeacherInputError(f"unknown outputs {unknown}; choose from {', '.join(OUTPUT_NAMES)}")
    if missing := [o for o in outputs if o not in info.outputs]:
        offered = ", ".join(info.outputs) or "none"
        raise TeacherInputError(f"the teacher {info.model!r} cannot give {missing}; it offers: {offered}")
    if outputs_dtype not in ("", "float32", "served"):
        raise TeacherInputError(f"outputs_dtype must be 'float32' or 'served', got {outputs_dtype!r}")


def batch_size_of(images: torch.Tensor | None, patches: torch.Tensor | None) -> int:
    return int((images if images is not None else patches).shape[0])  # type: ignore[union-attr]  # one of the two is given (checked by the caller)


def split_rows(n: int, max_rows: int) -> list[slice]:
    """Slices of at most `max_rows` rows covering range(n) (one slice when max_rows <= 0)."""
    if max_rows <= 0 or n <= max_rows:
        return [slice(0, n)]
    return [slice(i * max_rows, min(n, (i + 1) * max_rows)) for i in range(math.ceil(n / max_rows))]


def slice_rows(t: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if t is None else t[rows]


@dataclass(frozen=True)
class Batch:
    """One batch for the teacher: the arguments of `TeacherClient.infer`, `AsyncTeacherClient.infer` and
    `TeacherStream.submit` (see `TeacherClient.infer`)."""

    images: torch.Tensor | None = None
    patches: torch.Tensor | None = None
    keep_indices: torch.Tensor | None = None
    keep_counts: torch.Tensor | None = None
    request_id: str | None = None
    _: KW_ONLY
    send_patches: bool = True
    purpose: str = ""
    outputs: tuple[str, ...] = ()  # extra outputs: pre_logits, patch_tokens, cls_attention, cls_attention_heads
    outputs_dtype: str = ""  # "" / "float32", or "served" (the teacher's compute dtype)

    def requests(self, info: ModelInfo, model: str | None) -> Iterator[OutgoingRequest]:
        """Its InferRequests, built one at a time: one per part of at most `info.max_batch_images` rows, under
        `request_id` (a new one when None), or `<request_id>.<i>` when the batch is split."""
        rid = self.request_id or new_request_id()
        parts = split_rows(batch_size_of(self.images, self.patches), info.max_batch_images)
        for i, rows in enumerate(parts):
            yield build_request(
                info,
                images=slice_rows(self.images, rows),
                patches=slice_rows(self.patches, rows),
                keep_indices=slice_rows(self.keep_indices, rows),
                keep_counts=slice_rows(self.keep_counts, rows),
                request_id=rid if len(parts) == 1 else f"{rid}.{i}",
                model=model,
                send_patches=self.send_patches,
                purpose=self.purpose,
                outputs=tuple(self.outputs),
                outputs_dtype=self.outputs_dtype,
            )


def arguments_of(spec: Callable[P, A]) -> Callable[[Callable[[S, A], R]], Callable[Concatenate[S, P], R]]:
    """Makes a method that takes one `spec(...)` value take `spec`'s arguments instead, and builds the value from
    them: `@arguments_of(Batch)` gives the methods that take a batch one signature (for callers, help() and mypy)."""

    def decorate(method: Callable[[S, A], R]) -> Callable[Concatenate[S, P], R]:
        @functools.wraps(method)
        def call(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
            return method(self, spec(*args, **kwargs))

        own = inspect.signature(method)
        receiver = next(iter(own.parameters.values()))
        call.__signature__ = own.replace(  # type: ignore[attr-defined]
            parameters=[receiver, *inspect.signature(spec).parameters.values()]
        )
        return call

    return decorate


class InferResult(tuple[torch.Tensor, Usage]):
    """(logits [B, num_classes] float32, Usage), unpacked as before; `outputs` holds the extra outputs asked for
    (`Batch.outputs`: name -> tensor, in the dtype asked for; empty when none were)."""

    outputs: dict[str, torch.Tensor]

    def __new__(cls, logits: torch.Tensor, usage: Usage, outputs: dict[str, torch.Tensor] | None = None) -> InferResult:
        result = super().__new__(cls, (logits, usage))
        result.outputs = outputs or {}
        return result

    @property
    def logits(self) -> torch.Tensor:
        return self[0]

    @property
    def usage(self) -> Usage:
        return self[1]


def decode_response(resp: pb.InferResponse) -> InferResult:
    """(logits [B, num_classes] float32, Usage) with the extra outputs the response carries."""
    logits = proto_to_tensor(resp.logits, name="logits").float()
    outputs = {
        name: proto_to_tensor(getattr(resp.outputs, name), name=name)
        for name in OUTPUT_FIELDS
        if resp.HasField("outputs") and resp.outputs.HasField(name)
    }
    return InferResult(logits, Usage.from_proto(resp.usage), outputs)


def join_results(parts: list[InferResult]) -> InferResult:
    """The answer of a batch sent in parts (rows in order)."""
    if len(parts) == 1:
        return parts[0]
    usage = Usage()
    for part in parts:
        usage = usage + part.usage
    outputs = {name: torch.cat([p.outputs[name] for p in parts]) for name in parts[0].outputs}
    return InferResult(torch.cat([p.logits for p in parts]), usage, outputs)
