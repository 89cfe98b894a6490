"""Opt-in compiled teacher forward: `teacher-server serve --compile static`.

TorchInductor with weight freezing (weights folded in as constants, pre-packed for oneDNN on CPU) fuses the norms,
GELU and residual adds around the matrix products. Measured on the 2-core CPU (`make bench`, docs/benchmarks.md):
it lifts the fp32 masked forward from ~55-70% to ~75-80% of the machine's matmul rate. The gain needs static
shapes (with `dynamic=True` it was gone in our measurement), so every new (micro-batch size, K) shape compiles its
own graph: ~20 s on 2 CPU cores, paid by the first request of that shape. Up to `max_shapes` graphs are kept; shapes
beyond that run eager. It pays off for steady traffic (fixed student batch and keep), not for ragged one-off calls.
"""
from __future__ import annotations

import torch

from teacher_server.batcher import ForwardFn
from teacher_server.masked_teacher import MaskedTeacher

COMPILE_MODES = ("off", "static")


def compiled_forward_patches(teacher: MaskedTeacher, *, max_shapes: int = 8) -> ForwardFn:
    """`teacher.forward_patches` compiled by inductor with frozen weights, one graph per input shape.

    Call it under `torch.inference_mode()` (the batcher does): freezing treats the weights as constants, so a
    teacher served this way must not be trained or have its weights swapped afterwards.
    """
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, max_shapes)
    return torch.compile(teacher.forward_patches, dynamic=False)  # type: ignore[return-value]


def forward_patches_fn(teacher: MaskedTeacher, mode: str) -> ForwardFn:
    """The teacher's patch forward for a `--compile` mode: "off" is eager, "static" is `compiled_forward_patches`."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    return compiled_forward_patches(teacher) if mode == "static" else teacher.forward_patches
