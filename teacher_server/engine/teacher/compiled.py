"""Opt-in compiled teacher forward: `teacher-server serve --compile static` (or `graphs` on CUDA: cuda_graphs.py).

TorchInductor with weight freezing (weights folded in as constants, pre-packed for oneDNN on CPU) fuses the norms,
GELU and residual adds around the matrix products. Measured on the 2-core CPU (`make bench`, docs/benchmarks.md):
it lifts the fp32 masked forward from ~55-70% to ~75-80% of the machine's matmul rate. The gain needs static
shapes (with `dynamic=True` it was gone in our measurement), so every new (micro-batch size, K) shape compiles its
own graph: ~20 s on 2 CPU cores, paid by the first request of that shape unless `--compile-shapes B:K,...` compiled
it at start-up (`warm_up_shapes`). With shapes listed, every micro-batch of a listed K runs in pieces of those
shapes, the last one padded (shape_buckets.py), so no request of that K compiles; other shapes compile their own
graph, up to `max_shapes`, beyond that they run eager. It pays off for steady traffic (fixed student batch and keep).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from maskedkd.masked_teacher import MaskedTeacher
from teacher_server.engine.rows.rows_runner import ForwardFn
from teacher_server.engine.teacher.shape_buckets import BucketedForward, PaddedShape, ShapeFn, ShapeUse

log = logging.getLogger(__name__)

COMPILE_MODES = ("off", "static", "graphs")


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


def forward_pixels_fn(
    teacher: MaskedTeacher, mode: str, shapes: Sequence[tuple[int, int]] = (), use: ShapeUse | None = None
) -> ForwardFn:
    """The teacher's raw-pixel forward for a `--compile` mode: "off" is eager, "static" `compiled_forward_pixels`
    (run in pieces of `shapes` where listed), "graphs" CUDA graphs of `shapes` (cuda_graphs.py). `use`: told where
    each batch's rows ran, with shapes listed."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    if mode == "graphs":
        from teacher_server.engine.teacher.cuda_graphs import graphed_forward

        return graphed_forward(teacher, shapes, use)
    if mode == "off":
        return teacher.forward_pixels
    compiled = compiled_forward_pixels(teacher, max_shapes=max(8, len(shapes)))
    if not shapes:
        return compiled
    check_shapes(teacher, shapes)
    device = next(teacher.parameters()).device
    padded: dict[tuple[int, int], ShapeFn] = {
        (b, k): PaddedShape(compiled, b, k, teacher.geometry, device) for b, k in set(shapes)
    }
    return BucketedForward(padded, compiled, use=use)


def check_shapes(teacher: MaskedTeacher, shapes: Sequence[tuple[int, int]]) -> None:
    """ValueError for a shape keeping more patches than the teacher's grid has."""
    for b, k in shapes:
        if k > teacher.geometry.num_patches:
            raise ValueError(
                f"compile shape {b}:{k} keeps more patches than the teacher has ({teacher.geometry.num_patches})"
            )


def warm_up_shapes(forward: ForwardFn, teacher: MaskedTeacher, shapes: Sequence[tuple[int, int]]) -> list[float]:
    """Run `forward` once per (micro-batch images B, kept patches K) so each graph is compiled before serving.

    `forward` is the batcher's own (the same input dtype, device copy and inference mode), so the compiled graphs
    are the ones requests hit: a micro-batch of B rows with K kept patches each (mixed keep counts are bucketed into
    equal-K groups, so those are the shapes to list). Returns the seconds each shape took.
    """
    check_shapes(teacher, shapes)
    g = teacher.geometry
    c, p = g.in_chans, g.patch_size
    seconds = []
    for b, k in shapes:
        started = time.perf_counter()
        # Inputs laid out as the stager's rows are (views of flat uint8 / int64 buffers made outside inference
        # mode), run under inference mode as the batcher runs them: the graph guards on both. (With the shapes
        # bucketed, the prepared shape's own buffers are what the graph sees.)
        patches = torch.zeros(b * k * c * p * p, dtype=torch.uint8).view(b, k, c, p, p)  # [B,K,C,P,P]
        indices = torch.arange(k).repeat(b).view(b, k)  # [B,K]
        with torch.inference_mode():
            forward(patches, indices, None)
        seconds.append(time.perf_counter() - started)
        log.info("compiled shape %d:%d in %.1f s", b, k, seconds[-1])
    return seconds
