"""`--compile graphs`: the teacher's forward captured as CUDA graphs, one per prepared (B, K) shape.

An eager ViT forward launches a few hundred kernels, each after Python has worked out its arguments: for DeiT-S a
forward of a few milliseconds on the GPU takes about as long on the host, so at keep 25% it runs no faster than at
keep 50% (docs/gpu.md). A captured graph replays all of them with one launch. Each graph reads its input from static
buffers and writes its logits to a static output, so a replay is: copy the piece's rows in (on the device), replay,
copy the logits out before the shape runs again (`BucketedForward` does). The graphs share one memory pool, captured
largest first, and are captured at start-up: requests never wait for a capture.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from maskedkd.masked_teacher import MaskedTeacher
from teacher_server.engine.teacher.shape_buckets import BucketedForward, PaddedShape, ShapeFn, ShapeUse

log = logging.getLogger(__name__)

WARM_UP_CALLS = 2  # eager runs on a side stream before capturing (lazy initialisation, cuBLAS workspaces)


class GraphedShape:
    """One (B, K) shape of the teacher's forward captured as a CUDA graph, fed through its static input buffers;
    `pool`: a `torch.cuda.graph_pool_handle()` the shapes share."""

    def __init__(self, teacher: MaskedTeacher, b: int, k: int, pool: Any) -> None:
        device = next(teacher.parameters()).device
        self.inputs = PaddedShape(teacher.forward_pixels, b, k, teacher.geometry, device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(WARM_UP_CALLS):
                teacher.forward_pixels(self.inputs.pixels, self.inputs.indices, None)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph, pool=pool):
            self.logits = teacher.forward_pixels(self.inputs.pixels, self.inputs.indices, None)  # [B,classes]

    def __call__(self, pixels: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        g = self.inputs.load(pixels, indices)
        self.graph.replay()
        return self.logits[:g]  # [g,classes]: overwritten by this shape's next replay


def graphed_forward(
    teacher: MaskedTeacher, shapes: Sequence[tuple[int, int]], use: ShapeUse | None = None
) -> BucketedForward:
    """The teacher's raw-pixel forward with each listed shape captured (rows padded up to them), eager otherwise;
    `use` is told where each batch's rows ran."""
    device = next(teacher.parameters()).device
    if device.type != "cuda":
        raise ValueError(f"--compile graphs captures CUDA graphs; this teacher is on {device.type}")
    if not shapes:
        raise ValueError("--compile graphs needs --compile-shapes (the B:K shapes to capture)")
    g = teacher.geometry
    pool = torch.cuda.graph_pool_handle()
    captured: dict[tuple[int, int], ShapeFn] = {}
    for b, k in sorted(set(shapes), key=lambda s: s[0] * s[1], reverse=True):  # largest first: they share the pool
        if k > g.num_patches:
            raise ValueError(f"compile shape {b}:{k} keeps more patches than the teacher has ({g.num_patches})")
        started = time.perf_counter()
        captured[(b, k)] = GraphedShape(teacher, b, k, pool)
        log.info("captured shape %d:%d as a CUDA graph in %.2f s", b, k, time.perf_counter() - started)
    return BucketedForward(captured, teacher.forward_pixels, use=use)
