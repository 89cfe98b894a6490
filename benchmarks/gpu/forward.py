"""GPU section (runs only when CUDA is available): the bf16 masked forward as a share of the card's peak.

Peak is the vendor's dense bf16 tensor-core figure when the card is in the table below, and in any case the bf16
`torch.matmul` rate measured in the same run (8192 x 8192), which is what the card reaches in practice. Through the
server: the same model served in bf16 on the GPU by a real server process, one client, the same batch.
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.compute.teacher import build_teacher, make_batch
from benchmarks.config import KEEPS, BenchConfig
from benchmarks.timing import matmul_rate, measure
from maskedkd.keep import num_keep

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from NVIDIA datasheets; first substring match wins.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200", 989.4),
    ("H100", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
)
NOT_RUN = "not run: no GPU"


def spec_peak_tflops(device_name: str) -> float | None:
    for needle, peak in PEAK_BF16_TFLOPS:
        if needle in device_name:
            return peak
    return None


def graphed_rate(teacher: Any, tb: Any, kept: int, cfg: BenchConfig, sync: Any) -> dict[str, Any]:
    """img/s of the uint8-pixel forward eager and as `serve --compile graphs` replays it (this batch's shape captured),
    the pixels already on the card: what CUDA graphs save on a launch-bound forward."""
    from teacher_server.engine.teacher.cuda_graphs import graphed_forward

    pixels, idx = tb.pixels.cuda(), tb.indices.cuda()
    rates = {}
    for name, forward in (
        ("eager", teacher.forward_pixels),
        ("graphed", graphed_forward(teacher, [(cfg.gpu_batch, kept)])),
    ):

        def run(forward: Any = forward) -> None:
            with torch.inference_mode():
                for _ in range(cfg.calls_per_repeat):
                    forward(pixels, idx, None)

        t = measure(run, warmup=cfg.warmup, repeats=cfg.repeats, sync=sync)
        rates[name] = cfg.calls_per_repeat * cfg.gpu_batch / t.median_s
    return {
        "eager_images_per_s": rates["eager"],
        "images_per_s": rates["graphed"],
        "of_eager": rates["graphed"] / rates["eager"],
    }


def run_gpu_section(
    cfg: BenchConfig, pool: Any = None, *, device: str = "cuda", keeps: tuple[float, ...] = KEEPS
) -> dict[str, Any]:
    """`device="cpu"` exercises the same code on the CPU (tests only); `pool` None skips the gRPC measurement."""
    if device == "cuda" and not torch.cuda.is_available():
        return {"status": NOT_RUN}
    on_gpu = device == "cuda"
    sync = torch.cuda.synchronize if on_gpu else None
    name = torch.cuda.get_device_name(0) if on_gpu else "cpu (test run of the GPU section)"
    peak = spec_peak_tflops(name) if on_gpu else None
    mm = matmul_rate(
        8192 if cfg.mode == "full" else 256, warmup=cfg.warmup, repeats=cfg.repeats, device=device, dtype=torch.bfloat16
    )
    models = []
    for case in cfg.gpu_models:
        teacher = build_teacher(case, device=device, dtype=torch.bfloat16)
        full_gflops = teacher.gflops(teacher.geometry.num_patches)
        server = pool.get(f"gpu-{case.key}") if pool is not None else None
        client = None
        if server is not None:
            from student_client.transport.client import TeacherClient

            client = TeacherClient(server.address, server.api_key, timeout_s=600.0)
        rows = []
        try:
            for keep in keeps:
                kept = num_keep(keep, teacher.geometry.num_patches)
                tb = make_batch(teacher, cfg.gpu_batch, kept)
                x = tb.normalized.to(device=device, dtype=torch.bfloat16)
                idx = tb.indices.to(device)

                def forward() -> None:
                    with torch.inference_mode():
                        for _ in range(cfg.calls_per_repeat):
                            teacher.forward_patches(x, idx)

                t = measure(forward, warmup=cfg.warmup, repeats=cfg.repeats, sync=sync)
                ips = cfg.calls_per_repeat * cfg.gpu_batch / t.median_s
                tflops = ips * teacher.gflops(kept) / 1e3
                row: dict[str, Any] = {
                    "keep": keep,
                    "kept": kept,
                    "images_per_s": ips,
                    "tflops_per_s": tflops,
                    "billed_gflops_per_image": teacher.gflops(kept),
                    "flop_speedup": full_gflops / teacher.gflops(kept),
                    "of_spec_peak": tflops / peak if peak else None,
                    "of_matmul": tflops * 1e3 / mm["gflops_per_s"],
                    "timing": t.to_dict(),
                }
                if on_gpu:
                    row["graphed"] = graphed_rate(teacher, tb, kept, cfg, sync)
                if client is not None:

                    def remote() -> None:
                        for _ in range(cfg.calls_per_repeat):
                            client.infer(patches=tb.pixels, keep_indices=tb.indices)

                    rt = measure(remote, warmup=cfg.warmup, repeats=cfg.repeats)
                    row["grpc_images_per_s"] = cfg.calls_per_repeat * cfg.gpu_batch / rt.median_s
                    row["server_efficiency"] = row["grpc_images_per_s"] / ips
                rows.append(row)
        finally:
            if client is not None:
                client.close()
        for row in rows:
            row["speedup"] = row["images_per_s"] / rows[0]["images_per_s"]
        models.append({"model": case.key, "label": case.label, "batch": cfg.gpu_batch, "rows": rows})
        teacher, x, idx = None, None, None  # type: ignore[assignment]  # the next model needs the memory
        if on_gpu:
            torch.cuda.empty_cache()
    return {
        "status": "ok",
        "device": name,
        "dtype": "bfloat16",
        "spec_peak_tflops": peak,
        "matmul_bf16": mm,
        "models": models,
    }
