"""Opt-in compiled teacher forward: `teacher-server serve --compile static`.

TorchInductor with weight freezing (weights folded in as constants, pre-packed for oneDNN on CPU) fuses the norms,
GELU and residual adds around the matrix products. Measured on the 2-core CPU (`make bench`, docs/benchmarks.md):
it lifts the fp32 masked forward from ~55-70% to ~75-80% of the machine's matmul rate. The gain needs static
shapes (with `dynamic=True` it was gone in our measurement), so every new (micro-batch size, K) shape compiles its
own graph: ~20 s on 2 CPU cores, paid by the first request of that shape unless `--compile-shapes B:K,...` compiled
it at start-up (`warm_up_shapes`). Up to `max_shapes` graphs are kept; shapes
beyond that run eager. It pays off for steady traffic (fixed student batch and keep), not for ragged one-off calls.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from maskedkd.masked_teacher import MaskedTeacher
from teacher_server.engine.rows_runner import ForwardFn

log = logging.getLogger(__name__)

COMPILE_MODES = ("off", "static")


def compiled_forward_pixels(teacher: MaskedTeacher, *, max_shapes: int = 8) -> ForwardFn:
    """`teacher.forward_pixels` compiled by inductor with frozen weights, one graph per input shape.

    Call it under `torch.inference_mode()` (the batcher does): freezing treats the weights as constants, so a
    teacher served this way must not be trained or have its weights swapped afterwards.
    """
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, max_shapes)
    return torch.compile(teacher.forward_pixels, dynamic=False)


def forward_pixels_fn(teacher: MaskedTeacher, mode: str) -> ForwardFn:
    """The teacher's raw-pixel forward for a `--compile` mode: "off" is eager, "static" `compiled_forward_pixels`."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    return compiled_forward_pixels(teacher) if mode == "static" else teacher.forward_pixels


def warm_up_shapes(forward: ForwardFn, teacher: MaskedTeacher, shapes: Sequence[tuple[int, int]]) -> list[float]:
    """Run `forward` once per (micro-batch images B, kept patches K) so each graph is compiled before serving.

    `forward` is the batcher's own (the same input dtype, device copy and inference mode), so the compiled graphs
    are the ones requests hit: a micro-batch of B rows with K kept patches each (mixed keep counts are bucketed into
    equal-K groups, so those are the shapes to list). Returns the seconds each shape took.
    """
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, len(shapes))
    g = teacher.geometry
    c, p = g.in_chans, g.patch_size
    seconds = []
    for b, k in shapes:
        if k > g.num_patches:
            raise ValueError(f"compile shape {b}:{k} keeps more patches than the teacher has ({g.num_patches})")
        started = time.perf_counter()
        # Inputs laid out as the stager's rows are (views of flat uint8 / int64 buffers made outside inference
        # mode), run under inference mode as the batcher runs them: the graph guards on both.
        patches = torch.zeros(b * k * c * p * p, dtype=torch.uint8).view(b, k, c, p, p)  # [B,K,C,P,P]
        indices = torch.arange(k).repeat(b).view(b, k)  # [B,K]
        with torch.inference_mode():
            forward(patches, indices, None)
        seconds.append(time.perf_counter() - started)
        log.info("compiled shape %d:%d in %.1f s", b, k, seconds[-1])
    return seconds
