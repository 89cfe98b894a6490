"""Timing (warm-up, repeats, median), the machine's matmul rate, and a description of the machine."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Timing:
    """Seconds per repeat: the median is what the report uses; min and max show the spread."""

    median_s: float
    min_s: float
    max_s: float
    repeats: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def measure(fn: Callable[[], object], *, warmup: int, repeats: int, sync: Callable[[], None] | None = None) -> Timing:
    """Run `fn` `warmup` times untimed, then `repeats` times timed; `sync` (e.g. cuda.synchronize) closes a timing."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    samples = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        samples.append(time.perf_counter() - t0)
    return Timing(statistics.median(samples), min(samples), max(samples), len(samples))


def matmul_rate(
    n: int, *, warmup: int, repeats: int, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """FLOP/s of `torch.matmul` on two n x n matrices (2 n^3 FLOPs per product)."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=gen, device=device).to(dtype)
    b = torch.randn(n, n, generator=gen, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    calls = 1 if device == "cpu" else 20  # a GPU product takes microseconds: time several
    sync = torch.cuda.synchronize if device == "cuda" else None

    def run() -> None:
        for _ in range(calls):
            torch.matmul(a, b, out=out)

    t = measure(run, warmup=warmup, repeats=repeats, sync=sync)
    flops = 2.0 * n**3 * calls
    return {
        "n": n,
        "dtype": str(dtype).removeprefix("torch."),
        "device": device,
        "gflops_per_s": flops / t.median_s / 1e9,
        "timing": t.to_dict(),
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def git_revision() -> str:
    """HEAD's short hash, with "+dirty" when the working tree has changes (read-only git calls)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def machine_info() -> dict[str, Any]:
    import grpc
    import timm

    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "grpcio": grpc.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": load_average(),
        "git": git_revision(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (children, their children, ...), as the kernel lists them now."""
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                kids = [int(k) for k in task.read_text().split()]
                out += kids
                todo += kids
    return out


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of `pid` and every process below it (a server with ingest workers)."""
    total = 0.0
    for p in (pid, *descendants(pid)):
        with contextlib.suppress(OSError):
            total += process_cpu_s(p)
    return total


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid`, all its threads (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
