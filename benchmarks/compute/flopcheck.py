"""The analytic FLOP model (what the server bills) against `torch.utils.flop_counter.FlopCounterMode` on the real
masked forward, for every model and keep of the run."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import flop_counter as torch_flop_counter
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.compute.teacher import build_teacher, make_batch
from benchmarks.config import KEEPS, BenchConfig, ModelCase
from maskedkd.flops import masked_forward_flops
from maskedkd.keep import num_keep

BATCH = 2  # FLOPs are per image; two images check that nothing is counted per batch
# the CPU's fused attention kernel; torch 2.11 and older count 0 FLOPs for it
_CPU_SDPA = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _cpu_sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    return int(torch_flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape))


def flop_counter() -> FlopCounterMode:
    """torch's FlopCounterMode, silent. Where the installed torch has no formula for the CPU's fused attention kernel,
    it counts that kernel with the formula torch gives its other attention kernels (two batched matrix products)."""
    registry = torch_flop_counter.flop_registry
    missing = {} if _CPU_SDPA is None or _CPU_SDPA in registry else {_CPU_SDPA: _cpu_sdpa_flops}
    return FlopCounterMode(display=False, custom_mapping=missing)


def counted_flops(teacher: Any, kept: int) -> int:
    """FlopCounterMode's FLOPs of one image's masked forward."""
    tb = make_batch(teacher, BATCH, kept)
    counter = flop_counter()
    with torch.inference_mode(), counter:
        teacher.forward_patches(tb.normalized, tb.indices)
    return counter.get_total_flops() // BATCH


def run_flops_section(cfg: BenchConfig, extra: tuple[ModelCase, ...] = ()) -> dict[str, Any]:
    rows = []
    seen = set()
    for case in (*cfg.models, *extra):
        if case.key in seen:
            continue
        seen.add(case.key)
        teacher = build_teacher(case)
        for keep in KEEPS:
            kept = num_keep(keep, teacher.geometry.num_patches)
            model = masked_forward_flops(teacher.shape, kept)
            counted = counted_flops(teacher, kept)
            rows.append(
                {
                    "model": case.key,
                    "label": case.label,
                    "keep": keep,
                    "kept": kept,
                    "flop_model": model.total,
                    "flop_counter": counted,
                    "ratio": model.total / counted,
                    "attention_share": model.attention / model.total,
                }
            )
    return {"rows": rows, "max_abs_deviation": max(abs(r["ratio"] - 1.0) for r in rows)}
