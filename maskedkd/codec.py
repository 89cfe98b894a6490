"""Conversion between `maskedkd.v1.Tensor` messages and torch tensors (row-major, little-endian raw bytes)."""

from __future__ import annotations

import math
import sys
import warnings

import numpy as np
import torch

from maskedkd.text import clip
from maskedkd.v1 import teacher_pb2 as pb

# dtype name on the wire -> torch dtype. bfloat16 has no numpy dtype, so it travels as raw 16-bit words.
WIRE_DTYPES: dict[str, torch.dtype] = {
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
_TORCH_TO_WIRE = {v: k for k, v in WIRE_DTYPES.items()}
_BIG_ENDIAN = sys.byteorder == "big"
MAX_DIMS = 16  # far above the contract's 5, below numpy's 64
MAX_EXTENT = 1 << 40  # bound on prod(max(dim, 1)) when the caller gives no max_elements
# the tensors an Outputs message carries: pre_logits, patch_tokens, cls_attention (its heads travel in that field too)
OUTPUT_FIELDS: tuple[str, ...] = tuple(f.name for f in pb.Outputs.DESCRIPTOR.fields)


def _spend_read_only_warning() -> None:
    """torch.frombuffer warns once per process that a read-only buffer makes a tensor torch cannot protect (nothing
    here writes into one): spend that one warning here, silently, rather than a catch_warnings (~5 us) per view."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        torch.frombuffer(b"\0", dtype=torch.uint8)


_spend_read_only_warning()


class TensorDecodeError(ValueError):
    """A Tensor message that does not describe a valid tensor (bad dtype, shape or byte count)."""


def tensor_to_proto(tensor: torch.Tensor) -> pb.Tensor:
    """Encode a CPU or GPU tensor as a `Tensor` message."""
    msg = tensor_header(tensor)
    msg.data = tensor_bytes(tensor)
    return msg


def tensor_header(tensor: torch.Tensor) -> pb.Tensor:
    """The `Tensor` message of `tensor` without its bytes: dtype and shape (`tensor_bytes` gives the bytes)."""
    return pb.Tensor(dtype=_wire_dtype(tensor), shape=list(tensor.shape))


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The bytes of `Tensor.data` for `tensor` (row-major, little-endian), in one copy from host memory."""
    _wire_dtype(tensor)
    t = tensor.detach().contiguous().cpu()
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    arr = raw.numpy()
    if _BIG_ENDIAN:
        arr = arr.byteswap()
    return arr.tobytes()


def _wire_dtype(tensor: torch.Tensor) -> str:
    """The dtype's name on the wire; TypeError for one that cannot travel."""
    if tensor.dtype not in _TORCH_TO_WIRE:
        raise TypeError(f"dtype {tensor.dtype} cannot travel; use one of {sorted(WIRE_DTYPES)}")
    return _TORCH_TO_WIRE[tensor.dtype]


def proto_to_tensor(msg: pb.Tensor, *, name: str = "tensor", max_elements: int | None = None) -> torch.Tensor:
    """Decode a `Tensor` message into a tensor of its own (writable); raises `TensorDecodeError` naming `name` on any
    inconsistency."""
    return tensor_view(msg, name=name, max_elements=max_elements).clone()


def tensor_view(
    msg: pb.Tensor, data: bytes | memoryview | None = None, *, name: str = "tensor", max_elements: int | None = None
) -> torch.Tensor:
    """A read-only tensor over the message's bytes, without copying them (it keeps them alive); the same checks as
    `proto_to_tensor`. `data`: `msg.data` when the caller read it already (every read of the field copies it)."""
    data = msg.data if data is None else data
    shape, dtype = _checked_layout(msg, len(data), name=name, max_elements=max_elements)
    if math.prod(shape) == 0:
        return torch.empty(shape, dtype=dtype)
    if _BIG_ENDIAN:  # the wire is little-endian: a big-endian host swaps, in a copy
        np_dtype = np.dtype("int16" if dtype == torch.bfloat16 else msg.dtype)
        arr = np.frombuffer(data, dtype=np_dtype.newbyteorder("<")).reshape(shape)
        t = torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True))
        return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t
    # read-only bytes (the warning was spent at import): callers that write get proto_to_tensor's copy instead
    return torch.frombuffer(data, dtype=dtype).reshape(shape)


def _checked_layout(
    msg: pb.Tensor, nbytes: int, *, name: str, max_elements: int | None
) -> tuple[tuple[int, ...], torch.dtype]:
    """(shape, dtype) of a `Tensor` message whose data has `nbytes` bytes; TensorDecodeError when they disagree."""
    if msg.dtype not in WIRE_DTYPES:
        raise TensorDecodeError(f"{name}: unsupported dtype {clip(msg.dtype)}; expected one of {sorted(WIRE_DTYPES)}")
    if len(msg.shape) > MAX_DIMS:
        raise TensorDecodeError(f"{name}: shape has {len(msg.shape)} dimensions; at most {MAX_DIMS} allowed")
    shape = tuple(int(s) for s in msg.shape)
    if any(s < 0 for s in shape):
        raise TensorDecodeError(f"{name}: negative dimension in shape {clip(list(shape))}")
    limit = MAX_EXTENT if max_elements is None else max_elements
    numel = math.prod(shape)
    if numel > limit:
        raise TensorDecodeError(f"{name}: {clip(numel, 24)} elements exceed the limit of {limit}")
    # A zero-size tensor may still name huge dimensions, which numpy refuses: bound them as if each were >= 1.
    if math.prod(max(s, 1) for s in shape) > limit:
        raise TensorDecodeError(
            f"{name}: zero-size shape {clip(list(shape))} names dimensions beyond the limit of {limit} elements"
        )
    dtype = WIRE_DTYPES[msg.dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    if nbytes != numel * itemsize:
        raise TensorDecodeError(
            f"{name}: shape {clip(list(shape))} of {msg.dtype} needs {numel * itemsize} bytes, got {nbytes}"
        )
    return shape, dtype
