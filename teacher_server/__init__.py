"""MaskedKD teacher server: masked ViT teacher forward, FLOP model, gRPC service, ledger.

The core names are imported lazily so that light submodules (settings, ledger, CLI help) do not pay for torch/timm.
"""
from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from teacher_server.flops import FlopBreakdown, ViTShape, masked_forward_flops
    from teacher_server.masked_teacher import MaskedTeacher, UnsupportedModelError

_EXPORTS = {
    "MaskedTeacher": "teacher_server.masked_teacher",
    "UnsupportedModelError": "teacher_server.masked_teacher",
    "ViTShape": "teacher_server.flops",
    "FlopBreakdown": "teacher_server.flops",
    "masked_forward_flops": "teacher_server.flops",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'teacher_server' has no attribute {name!r}")
