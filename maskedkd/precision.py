"""Which floating-point precision a device computes natively: the one rule behind `teacher-server serve --dtype auto`
and `student-client train --precision auto`.

bf16 is chosen only where the hardware multiplies it natively: a CPU with AVX512-BF16 or AMX-BF16, or a CUDA device of
compute capability 8.0 or higher (Ampere on). Elsewhere bf16 is emulated and slower than fp32 (on an AVX2-only EPYC a
2048^3 bf16 matmul ran ~50x slower than fp32: benchmarks' dtype section), so auto means float32 there.
`MASKEDKD_FORCE_CPU_BF16=1|0` overrides the CPU detection (tests cover both answers on any CPU).
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch

FORCE_CPU_BF16_ENV = "MASKEDKD_FORCE_CPU_BF16"
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@lru_cache(maxsize=1)
def _detected_cpu_bf16() -> tuple[bool, str]:
    """(native bf16?, why) from /proc/cpuinfo's flags, else torch's CPU capability."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                found = [f for f in CPU_BF16_FLAGS if f in line.split()]
                return bool(found), f"cpu flags: {' '.join(found) or 'no avx512_bf16/amx_bf16'}"
    except OSError:
        pass
    capability = torch.backends.cpu.get_cpu_capability()  # "AVX2", "AVX512", "AMX", ... (no bf16 flag list)
    native = "AMX" in capability.upper() or "BF16" in capability.upper()
    return native, f"torch cpu capability {capability}"


def cpu_bf16_support() -> tuple[bool, str]:
    """(does this CPU compute bf16 natively, the reason); `MASKEDKD_FORCE_CPU_BF16=1|0` decides when set."""
    forced = os.environ.get(FORCE_CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1", f"{FORCE_CPU_BF16_ENV}={forced}"
    return _detected_cpu_bf16()


def native_bf16(device: torch.device | str) -> tuple[bool, str]:
    """(does `device` compute bf16 natively, the reason)."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return (major, minor) >= (8, 0), f"cuda compute capability {major}.{minor}"
    if device.type == "cpu":
        return cpu_bf16_support()
    return False, f"device {device.type}: bf16 not assumed"


def resolve_dtype(name: str, device: torch.device | str) -> tuple[torch.dtype, str]:
    """`auto|float32|bfloat16|float16` -> (dtype, why it was chosen)."""
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {name!r}")
        return DTYPES[name], "asked for"
    native, why = native_bf16(device)
    return (torch.bfloat16 if native else torch.float32), f"auto ({why})"


def resolve_precision(name: str, device: torch.device | str) -> str:
    """Student training precision `auto|bf16|fp32` -> "bf16" or "fp32" by the same rule as `resolve_dtype`."""
    if name not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {name!r}")
    if name != "auto":
        return name
    return "bf16" if native_bf16(device)[0] else "fp32"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
