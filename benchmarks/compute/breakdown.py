"""Where the masked forward's time goes: torch.profiler self CPU time per op, grouped into matrix products,
fused attention, norms, activations, data movement and the rest, with the FLOP rate each group reaches.

This is the evidence behind the compute-efficiency target: the FLOP model counts only matrix products, so time spent
outside them (norms, GELU, softmax, copies) is what keeps the forward below the machine's matmul rate.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.compute.teacher import build_teacher, make_batch
from benchmarks.config import BenchConfig
from maskedkd.flops import masked_forward_flops
from maskedkd.keep import num_keep

GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (  # first match wins
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention")),
    ("matmul", ("addmm", "::mm", "bmm", "matmul", "linear", "mkldnn")),
    ("layer_norm", ("layer_norm",)),
    ("gelu", ("gelu",)),
    ("softmax", ("softmax",)),
    (
        "data_movement",
        (
            "copy",
            "index",
            "gather",
            "cat",
            "clone",
            "contiguous",
            "permute",
            "transpose",
            "expand",
            "reshape",
            "view",
            "empty",
            "_to_copy",
            "unbind",
            "split",
            "select",
            "slice",
            "stack",
        ),
    ),
    ("elementwise", ("add", "mul", "div", "sub", "masked_fill", "fill")),
)


def group_of(op_name: str) -> str:
    name = op_name.lower()
    for group, needles in GROUPS:
        if any(n in name for n in needles):
            return group
    return "other"


def run_breakdown_section(cfg: BenchConfig, matmul_gflops_per_s: float) -> dict[str, Any]:
    models = []
    for case in cfg.models:
        teacher = build_teacher(case)
        kept = num_keep(cfg.profile_keep, teacher.geometry.num_patches)
        tb = make_batch(teacher, cfg.batch, kept)
        with torch.inference_mode():
            teacher.forward_patches(tb.normalized, tb.indices)  # warm-up outside the profile
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                teacher.forward_patches(tb.normalized, tb.indices)
        seconds: dict[str, float] = {}
        for event in prof.key_averages():
            group = group_of(event.key)
            seconds[group] = seconds.get(group, 0.0) + event.self_cpu_time_total / 1e6
        total = sum(seconds.values())
        flops = masked_forward_flops(teacher.shape, kept)
        gemm_flops = (flops.total - flops.attention) * cfg.batch
        groups = {g: {"seconds": s, "share": s / total} for g, s in sorted(seconds.items(), key=lambda kv: -kv[1])}
        matmul_s = seconds.get("matmul", 0.0)
        attention_s = seconds.get("attention", 0.0)
        models.append(
            {
                "model": case.key,
                "label": case.label,
                "keep": cfg.profile_keep,
                "kept": kept,
                "batch": cfg.batch,
                "profiled_s": total,
                "groups": groups,
                "matmul_gflops_per_s": gemm_flops / matmul_s / 1e9 if matmul_s else None,
                "matmul_vs_machine": gemm_flops / matmul_s / 1e9 / matmul_gflops_per_s if matmul_s else None,
                "attention_gflops_per_s": flops.attention * cfg.batch / attention_s / 1e9 if attention_s else None,
                "non_product_share": 1.0 - (matmul_s + attention_s) / total if total else None,
            }
        )
    return {"models": models, "note": "self CPU time of each op under torch.profiler (adds some overhead)"}
