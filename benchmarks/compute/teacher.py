"""Teacher throughput at each keep, in-process (`MaskedTeacher.forward_patches`) and through the gRPC server.

The in-process rate is measured eager and, with `compiled`, as `teacher-server serve --compile static` runs it
(inductor, frozen weights, one graph per shape; the first call's time is the compile cost of that shape).
Both paths run the same architecture on the same batch, in the dtype the server serves by default (`--dtype auto`),
with the same torch thread count, in interleaved rounds (one in-process repeat, then one gRPC repeat, `repeats`
times): in-process in this process, gRPC in the server process (this process then only waits). The server's
efficiency is the median over rounds of the per-round ratio, so a load swing hits both paths of a round alike. The gRPC
client is the product's `TeacherClient` sending kept patches as uint8, one request at a time (one client, nothing in
flight twice), so the server's micro-batch is exactly the client's batch.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import timm
import torch

from benchmarks.config import KEEPS, BenchConfig, ModelCase
from benchmarks.timing import Timing, measure
from maskedkd.keep import num_keep
from maskedkd.masked_teacher import MaskedTeacher
from teacher_server.engine.rows.rows_runner import ForwardFn
from teacher_server.engine.teacher.compiled import compiled_forward_pixels


@dataclass
class TeacherBatch:
    """One batch of kept patches in the two forms the two paths take."""

    pixels: torch.Tensor  # [B, K, C, P, P] uint8, what a client sends
    normalized: torch.Tensor  # [B, K, C, P, P] float32, what forward_patches takes
    indices: torch.Tensor  # [B, K] int64, sorted positions on the teacher grid


def build_teacher(case: ModelCase, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> MaskedTeacher:
    model = timm.create_model(case.timm_name, pretrained=False, **case.kwargs)
    return MaskedTeacher(model.to(device=device, dtype=dtype).eval())


def make_batch(teacher: MaskedTeacher, batch: int, kept: int, seed: int = 0) -> TeacherBatch:
    gen = torch.Generator().manual_seed(seed)
    c, p = teacher.geometry.in_chans, teacher.geometry.patch_size
    pixels = torch.randint(0, 256, (batch, kept, c, p, p), dtype=torch.uint8, generator=gen)
    noise = torch.rand(batch, teacher.geometry.num_patches, generator=gen)
    indices = noise.argsort(dim=1)[:, :kept].sort(dim=1).values
    mean = torch.tensor(teacher.geometry.mean).view(1, 1, -1, 1, 1)
    std = torch.tensor(teacher.geometry.std).view(1, 1, -1, 1, 1)
    normalized = (pixels.float() / 255.0 - mean) / std
    return TeacherBatch(pixels, normalized, indices)


def inprocess_rate(forward: ForwardFn, tb: TeacherBatch, cfg: BenchConfig) -> dict[str, Any]:
    """Images/s of `forward` (the compiled `forward_pixels` the server runs with --compile static, on the uint8
    pixels); `first_call_s`: its first call's time (the compile)."""
    calls = cfg.calls_per_repeat
    started = time.perf_counter()
    with torch.inference_mode():
        forward(tb.pixels, tb.indices, None)  # compiles this shape
    first_call_s = time.perf_counter() - started

    def run() -> None:
        with torch.inference_mode():
            for _ in range(calls):
                forward(tb.pixels, tb.indices, None)

    t = measure(run, warmup=cfg.warmup, repeats=cfg.repeats)
    return {
        "images_per_s": calls * tb.indices.shape[0] / t.median_s,
        "timing": t.to_dict(),
        "first_call_s": first_call_s,
    }


def _timing(samples: list[float]) -> Timing:
    return Timing(statistics.median(samples), min(samples), max(samples), len(samples))


def interleaved_rates(
    forward: ForwardFn, client: Any, tb: TeacherBatch, cfg: BenchConfig, dtype: torch.dtype
) -> tuple[dict[str, Any], dict[str, Any], float]:
    """(in-process, gRPC, median per-round gRPC/in-process ratio) over `cfg.repeats` interleaved rounds."""
    calls, batch = cfg.calls_per_repeat, tb.indices.shape[0]
    x = tb.normalized.to(dtype)
    usage_gflops: list[float] = []

    def local() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for _ in range(calls):
                forward(x, tb.indices, None)
        return time.perf_counter() - t0

    def remote() -> float:
        t0 = time.perf_counter()
        for _ in range(calls):
            _, usage = client.infer(patches=tb.pixels, keep_indices=tb.indices)
            usage_gflops.append(usage.gflops)
        return time.perf_counter() - t0

    first_call_s = local()
    for _ in range(cfg.warmup):
        local(), remote()
    rounds = [(local(), remote()) for _ in range(max(1, cfg.repeats))]
    inproc_t, grpc_t = _timing([a for a, _ in rounds]), _timing([b for _, b in rounds])
    inproc = {
        "images_per_s": calls * batch / inproc_t.median_s,
        "timing": inproc_t.to_dict(),
        "first_call_s": first_call_s,
    }
    remote_out = {
        "images_per_s": calls * batch / grpc_t.median_s,
        "timing": grpc_t.to_dict(),
        "billed_gflops_per_call": usage_gflops[-1],
    }
    return inproc, remote_out, statistics.median(a / b for a, b in rounds)


def run_teacher_section(
    cfg: BenchConfig,
    pool: Any,
    matmul_gflops_per_s: float,
    *,
    dtype: torch.dtype = torch.float32,
    limit_gflops_per_s: float | None = None,
) -> dict[str, Any]:
    """`matmul_gflops_per_s`: the machine's matmul rate in `dtype` (the dtype served); `limit_gflops_per_s`: the
    best dtype's rate (the machine's limit)."""
    from student_client.transport.client import TeacherClient

    limit = limit_gflops_per_s or matmul_gflops_per_s
    models = []
    for case in cfg.models:
        teacher = build_teacher(case, dtype=dtype)
        compiled = compiled_forward_pixels(teacher) if cfg.compiled else None
        server = pool.get(case.key)
        full_gflops = teacher.gflops(teacher.geometry.num_patches)
        rows = []
        with TeacherClient(server.address, server.api_key, timeout_s=600.0) as client:
            for keep in KEEPS:
                kept = num_keep(keep, teacher.geometry.num_patches)
                tb = make_batch(teacher, cfg.batch, kept)
                gflops = teacher.gflops(kept)
                inproc, remote, server_efficiency = interleaved_rates(teacher.forward_patches, client, tb, cfg, dtype)
                achieved = inproc["images_per_s"] * gflops
                fast = inprocess_rate(compiled, tb, cfg) if compiled is not None else None
                rows.append(
                    {
                        "keep": keep,
                        "kept": kept,
                        "gflops_per_image": gflops,
                        "flop_speedup": full_gflops / gflops,
                        "inprocess": inproc,
                        "grpc": remote,
                        "server_efficiency": server_efficiency,
                        "achieved_gflops_per_s": achieved,
                        "compute_efficiency": achieved / matmul_gflops_per_s,
                        "grpc_gflops_per_s": remote["images_per_s"] * gflops,
                        "of_limit": remote["images_per_s"] * gflops / limit,
                        "compiled": None
                        if fast is None
                        else {
                            **fast,
                            "achieved_gflops_per_s": fast["images_per_s"] * gflops,
                            "compute_efficiency": fast["images_per_s"] * gflops / matmul_gflops_per_s,
                            "vs_eager": fast["images_per_s"] / inproc["images_per_s"],
                        },
                        "billing_matches_flop_model": abs(remote["billed_gflops_per_call"] - cfg.batch * gflops)
                        <= 1e-6 * cfg.batch * gflops,
                    }
                )
        base_in, base_rpc = rows[0]["inprocess"]["images_per_s"], rows[0]["grpc"]["images_per_s"]
        for row in rows:
            row["inprocess_speedup"] = row["inprocess"]["images_per_s"] / base_in
            row["grpc_speedup"] = row["grpc"]["images_per_s"] / base_rpc
        models.append(
            {
                "model": case.key,
                "label": case.label,
                "timm_name": case.timm_name,
                "kwargs": case.kwargs,
                "num_patches": teacher.geometry.num_patches,
                "batch": cfg.batch,
                "rows": rows,
            }
        )
        del teacher, compiled
    return {
        "models": models,
        "batch": cfg.batch,
        "calls_per_repeat": cfg.calls_per_repeat,
        "matmul_gflops_per_s": matmul_gflops_per_s,
        "dtype": str(dtype).removeprefix("torch."),
        "limit_gflops_per_s": limit,
        "rounds": max(1, cfg.repeats),
    }
