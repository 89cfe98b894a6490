"""The reproduction's state in the repository: every finished run's result (and the fidelity probe's), written beside
the doc (`docs/reproduction_CONFIG_runs.json`) after every run and committed with it, so that a reproduction spread
over several sessions or machines continues from a clean clone: runs recorded there under the same sizes are restored
into OUT and not trained (or billed) again, provided the teacher is the same file (its SHA-256 is recorded: a config
whose teacher is trained by the run restores nothing until that teacher is committed). Each run records the machine
and precision it ran on."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
from collections.abc import Collection
from functools import lru_cache
from pathlib import Path
from typing import Any

from experiments.configs import ReproConfig

RESULT = "result.json"
# What makes two runs comparable. Not the scheduling (threads, --parallel), the seeds or methods chosen, or where the
# teacher lies (a trained teacher is committed later under models/ without changing what it is).
SIZE_FIELDS = (
    "dataset",
    "teacher",
    "student",
    "train_per_class",
    "test_per_class",
    "teacher_train_per_class",
    "lambda_kd",
    "tau",
    "micro_batches",
)


def runs_path(doc: Path, cfg: ReproConfig) -> Path:
    return doc.with_name(f"{doc.stem}_{cfg.name}_runs.json")


def sizes(cfg: ReproConfig) -> dict[str, Any]:
    full = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples -> lists, as read back from the file
    return {k: full[k] for k in SIZE_FIELDS}


@lru_cache(maxsize=1)
def machine() -> dict[str, Any]:
    """Where this process runs: CPU model, cores, torch, and the precision `auto` resolves to (the runs use auto).
    The same for every run of the process: read once."""
    import torch

    from maskedkd.precision import cpu_bf16_support, resolve_precision

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "precision": resolve_precision("auto", "cpu"),
        "precision_why": cpu_bf16_support()[1],
    }


def sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def save(
    path: Path,
    cfg: ReproConfig,
    *,
    checkpoint: Path,
    teacher: dict[str, Any] | None,
    runs: list[dict[str, Any]],
    fidelity: dict[str, Any] | None,
) -> None:
    state = {
        "config": cfg.name,
        "sizes": sizes(cfg),
        "teacher_sha256": sha256(checkpoint),
        "teacher": teacher,
        "fidelity": fidelity,
        "runs": sorted(runs, key=lambda r: (r["method"], r["seed"])),
    }
    path.write_text(json.dumps(state, indent=1, default=str) + "\n")


PROBE_STUDENT = "maskedkd_50"  # the fidelity probe measures this method's first-seed student


def restore(path: Path, cfg: ReproConfig, out: Path, *, checkpoint: Path, skip: Collection[str] = ()) -> list[str]:
    """Write OUT's result files from the committed state where OUT lacks them, but for the methods in `skip` (being
    redone); returns what was restored. A state recorded under other sizes or with another teacher is left alone (with
    a note): its numbers would not compare."""
    if not path.is_file():
        return []
    state = json.loads(path.read_text())
    if state.get("sizes") != sizes(cfg):
        print(f"[repro] {path.name} was recorded under other sizes: not reused", flush=True)
        return []
    if state.get("teacher_sha256") is None or state["teacher_sha256"] != sha256(checkpoint):
        print(f"[repro] {path.name} was recorded with another teacher than {checkpoint}: not reused", flush=True)
        return []
    restored: list[str] = []

    def put(target: Path, record: dict[str, Any] | None, name: str) -> None:
        if record is not None and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(record, indent=2, default=str))
            restored.append(name)

    put(out / "teacher" / RESULT, state.get("teacher"), "teacher")
    if PROBE_STUDENT not in skip:  # the probe is of that method's first student
        put(out / "fidelity.json", state.get("fidelity"), "fidelity")
    for run in state.get("runs", []):
        if run["method"] in skip:
            continue
        name = f"{run['method']}-s{run['seed']}"
        put(out / "runs" / name / RESULT, run, name)
    if restored:
        print(f"[repro] restored {len(restored)} finished result(s) from {path.name}", flush=True)
    return restored
