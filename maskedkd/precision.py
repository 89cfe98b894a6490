"""Which floating-point precision a device computes natively: the one rule behind `teacher-server serve --dtype auto`
and `student-client train --precision auto`.

bf16 is chosen only where the hardware multiplies it natively and faster than fp32: a CUDA device of compute
capability 8.0 or higher (Ampere on), or a CPU with AVX512-BF16 or AMX-BF16 on which a quick interleaved bf16/fp32
matmul (~0.1-0.3 s, once per process) measures bf16 at least `CPU_BF16_MIN_SPEEDUP` times faster. The flags alone are
not enough: an AVX512-BF16 EPYC ran bf16 4x faster than fp32, an AVX512-BF16 Xeon without AMX 2x slower (both 2
cores). Without the flags bf16 is emulated (an AVX2-only EPYC: ~50x slower than fp32) and nothing is measured.
`MASKEDKD_FORCE_CPU_BF16=1|0` overrides the CPU detection (tests cover both answers on any CPU).
"""

from __future__ import annotations

import os
import time
from functools import lru_cache
from pathlib import Path

import torch

FORCE_CPU_BF16_ENV = "MASKEDKD_FORCE_CPU_BF16"
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CPU_BF16_MIN_SPEEDUP = 1.25  # bf16 must clearly win: it also costs accuracy (teacher agreement, student steps)


def _cpu_bf16_flags() -> tuple[bool, str]:
    """(does the CPU claim bf16 instructions, which) from /proc/cpuinfo's flags, else torch's CPU capability."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                found = [f for f in CPU_BF16_FLAGS if f in line.split()]
                return bool(found), f"cpu flags: {' '.join(found) or 'no avx512_bf16/amx_bf16'}"
    except OSError:
        pass
    capability = torch.backends.cpu.get_cpu_capability()  # "AVX2", "AVX512", "AMX", ... (no bf16 flag list)
    return "AMX" in capability.upper() or "BF16" in capability.upper(), f"torch cpu capability {capability}"


@lru_cache(maxsize=1)
def measured_cpu_bf16_speedup(n: int = 1024, rounds: int = 4) -> float:
    """fp32 time / bf16 time of an n x n matmul on the CPU, best of `rounds` interleaved pairs. Measured once per
    process, on one thread and in that thread's own CPU time, so other processes' load on the machine does not reach
    the ratio: timed by the wall clock on all threads, a loaded 2-core Xeon whose bf16 runs at 0.55x fp32 read 0.60 to
    1.80 (4 of 12 past the 1.25 needed), and processes on one machine then chose different dtypes."""
    a32, b32 = torch.randn(n, n), torch.randn(n, n)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    best = {torch.float32: float("inf"), torch.bfloat16: float("inf")}
    pairs = ((torch.float32, a32, b32), (torch.bfloat16, a16, b16))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the product runs on this thread, which thread_time() measures
    try:
        for _dtype, a, b in pairs:  # warm-up: the first product of each dtype pays for kernel selection
            torch.mm(a, b)
        for _ in range(rounds):
            for dtype, a, b in pairs:
                start = time.thread_time()
                torch.mm(a, b)
                best[dtype] = min(best[dtype], time.thread_time() - start)
    finally:
        torch.set_num_threads(threads)
    return best[torch.float32] / max(best[torch.bfloat16], 1e-9)


@lru_cache(maxsize=1)
def detected_cpu_bf16() -> tuple[bool, str]:
    """(native and faster bf16?, why): the flags first, then the measured matmul speed-up; MASKEDKD_FORCE_CPU_BF16
    is not read here (cpu_bf16_support reads it)."""
    flagged, why = _cpu_bf16_flags()
    if not flagged:
        return False, why
    speedup = measured_cpu_bf16_speedup()
    verdict = "bf16" if speedup >= CPU_BF16_MIN_SPEEDUP else "fp32"
    return speedup >= CPU_BF16_MIN_SPEEDUP, (
        f"{why}; measured bf16 matmul {speedup:.2f}x fp32 (needs {CPU_BF16_MIN_SPEEDUP}x): {verdict}"
    )


def cpu_bf16_support() -> tuple[bool, str]:
    """(does this CPU compute bf16 natively, the reason); `MASKEDKD_FORCE_CPU_BF16=1|0` decides when set."""
    forced = os.environ.get(FORCE_CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1", f"{FORCE_CPU_BF16_ENV}={forced}"
    return detected_cpu_bf16()


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
