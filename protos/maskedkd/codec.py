"""Conversion between `maskedkd.v1.Tensor` messages and torch tensors (row-major, little-endian raw bytes)."""
from __future__ import annotations

import math
import sys

import numpy as np
import torch

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


class TensorDecodeError(ValueError):
    """A Tensor message that does not describe a valid tensor (bad dtype, shape or byte count)."""


def tensor_to_proto(tensor: torch.Tensor) -> pb.Tensor:
    """Encode a CPU or GPU tensor as a `Tensor` message."""
    if tensor.dtype not in _TORCH_TO_WIRE:
        raise TypeError(f"dtype {tensor.dtype} cannot travel; use one of {sorted(WIRE_DTYPES)}")
    t = tensor.detach().contiguous().cpu()
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    arr = raw.numpy()
    if _BIG_ENDIAN:
        arr = arr.byteswap()
    return pb.Tensor(dtype=_TORCH_TO_WIRE[t.dtype], shape=list(t.shape), data=arr.tobytes())


def proto_to_tensor(msg: pb.Tensor, *, name: str = "tensor", max_elements: int | None = None) -> torch.Tensor:
    """Decode a `Tensor` message; raises `TensorDecodeError` naming `name` on any inconsistency."""
    if msg.dtype not in WIRE_DTYPES:
        raise TensorDecodeError(f"{name}: unsupported dtype {msg.dtype!r}; expected one of {sorted(WIRE_DTYPES)}")
    shape = tuple(int(s) for s in msg.shape)
    if any(s < 0 for s in shape):
        raise TensorDecodeError(f"{name}: negative dimension in shape {list(shape)}")
    numel = math.prod(shape)
    if max_elements is not None and numel > max_elements:
        raise TensorDecodeError(f"{name}: {numel} elements exceed the limit of {max_elements}")
    dtype = WIRE_DTYPES[msg.dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(msg.data) != numel * itemsize:
        raise TensorDecodeError(
            f"{name}: shape {list(shape)} of {msg.dtype} needs {numel * itemsize} bytes, got {len(msg.data)}"
        )
    np_dtype = np.dtype("int16" if dtype == torch.bfloat16 else msg.dtype)
    arr = np.frombuffer(msg.data, dtype=np_dtype.newbyteorder("<")).reshape(shape)
    t = torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True))
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t
