"""Precision section: the machine's matmul rate in each dtype (the best one is the machine's limit), which dtype
`--dtype auto` serves and `--precision auto` trains in, and a MaskedKD-50 training step in fp32 against bf16.

On a CPU without native bf16 (no avx512_bf16 / AMX, e.g. an AVX2-only EPYC) bf16 is emulated and far slower than
fp32, so auto picks fp32 and the bf16 targets are reported as not applicable, with what was measured. There the bf16
matmul is timed at a smaller n (`bf16_emulated_n`): at 2048 one product would take most of a minute.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.config import BenchConfig
from benchmarks.timing import matmul_rate
from maskedkd.keep import num_keep
from maskedkd.precision import dtype_name, native_bf16, resolve_dtype

FP32_SERVER_SUFFIX = "-fp32"  # pool key of the float32 server beside the default one (native-bf16 machines only)


def dtype_rates(cfg: BenchConfig, device: str = "cpu") -> dict[str, Any]:
    """matmul GFLOP/s per dtype, the native-bf16 verdict and the dtype `--dtype auto` resolves to on `device`."""
    native, why = native_bf16(device)
    served, _ = resolve_dtype("auto", device)
    repeats = max(3, cfg.repeats)
    fp32 = matmul_rate(cfg.matmul_size, warmup=cfg.warmup, repeats=repeats, device=device)
    bf16_n = cfg.matmul_size if native else min(cfg.matmul_size, cfg.bf16_emulated_n)
    bf16 = matmul_rate(bf16_n, warmup=1, repeats=3, device=device, dtype=torch.bfloat16)
    rates = {"float32": fp32["gflops_per_s"], "bfloat16": bf16["gflops_per_s"]}
    limit = max(rates, key=lambda k: rates[k])
    return {
        "native_bf16": native,
        "why": why,
        "served_dtype": dtype_name(served),
        "rates": rates,
        "matmul": {"float32": fp32, "bfloat16": bf16},
        "bf16_vs_fp32": rates["bfloat16"] / rates["float32"],
        "limit_dtype": limit,
        "limit_gflops_per_s": rates[limit],
        "served_gflops_per_s": rates[dtype_name(served)],
    }


def training_precision_pair(cfg: BenchConfig, pool: Any, workdir: Path, threads: int) -> dict[str, Any]:
    """MaskedKD-50 (SIPS) step time with the student in fp32 and in bf16 (autocast), same teacher server; and the
    student's step alone (no KD) in each, which shows the student's own speedup apart from the teacher's time (the
    teacher serves in the same dtype in both runs, on the same cores)."""
    from benchmarks.compute.training import timed_run

    pair = cfg.train_pairs[0]
    server = pool.get(pair.teacher.key)
    steps: dict[str, Any] = {}
    alone: dict[str, Any] = {}
    try:
        for mode, into in (("kd", steps), ("none", alone)):
            for precision in ("fp32", "bf16"):
                opts = {"mode": mode, "precision": precision, "micro_batches": 1}
                if mode == "kd":
                    opts |= {"strategy": "sips", "keep": 0.5}
                times, _ = timed_run(
                    pair,
                    server,
                    opts,
                    workdir / f"{mode}-{precision}",
                    steps=(cfg.precision_train_warmup, cfg.precision_train_steps),
                    batch_size=cfg.precision_train_batch,
                    threads=threads,
                    what=f"{precision} {'MaskedKD' if mode == 'kd' else 'no-KD'} training run",
                )
                into[precision] = {"step_s": statistics.median(times), "steps_timed": len(times)}
    finally:
        torch.set_num_threads(threads)  # run_training sets the process-wide thread count
    return {
        "pair": pair.key,
        "student": pair.student,
        "batch_size": cfg.precision_train_batch,
        "steps": steps,
        "bf16_speedup": steps["fp32"]["step_s"] / steps["bf16"]["step_s"],
        "student_alone": alone,
        "student_alone_bf16_speedup": alone["fp32"]["step_s"] / alone["bf16"]["step_s"],
    }


def default_vs_fp32_server(cfg: BenchConfig, pool: Any) -> dict[str, Any]:
    """gRPC images/s of the default (`--dtype auto`) server against a float32 server of the same model at keep 50%,
    in interleaved rounds; the median per-round ratio. Only run where auto resolves to bf16."""
    from benchmarks.compute.teacher import build_teacher, make_batch
    from student_client.transport.client import TeacherClient

    case = next(c for c in cfg.models if c.key == "deit_s_224")
    teacher = build_teacher(case)
    kept = num_keep(0.5, teacher.geometry.num_patches)
    tb = make_batch(teacher, cfg.batch, kept)
    default, fp32 = pool.get(case.key), pool.get(case.key + FP32_SERVER_SUFFIX)
    with (
        TeacherClient(default.address, default.api_key, timeout_s=600.0) as a,
        TeacherClient(fp32.address, fp32.api_key, timeout_s=600.0) as b,
    ):

        def timed(client: Any) -> float:
            t0 = time.perf_counter()
            client.infer(patches=tb.pixels, keep_indices=tb.indices)
            return time.perf_counter() - t0

        for _ in range(cfg.warmup):
            timed(a), timed(b)
        rounds = [(timed(a), timed(b)) for _ in range(max(1, cfg.repeats))]
    return {
        "keep": 0.5,
        "batch": cfg.batch,
        "rounds": len(rounds),
        "default_images_per_s": cfg.batch / statistics.median(t for t, _ in rounds),
        "fp32_images_per_s": cfg.batch / statistics.median(t for _, t in rounds),
        "ratio": statistics.median(f / d for d, f in rounds),
    }


def run_precision_training(cfg: BenchConfig, pool: Any, workdir: Path, threads: int, native: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"training": training_precision_pair(cfg, pool, workdir, threads)}
    if native and any(c.key == "deit_s_224" for c in cfg.models):
        out["default_vs_fp32_server"] = default_vs_fp32_server(cfg, pool)
    return out
