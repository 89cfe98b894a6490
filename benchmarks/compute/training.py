"""End-to-end training step time: the product's student loop (`run_training`, one worker, in this process) against
a real teacher server process on loopback, for no KD, full KD and MaskedKD 75/50/25 (SIPS).

Step time is the loop's own `step_s` (data on hand -> forward, teacher answers, loss, backward, optimizer step),
median over the steps after warm-up. The FLOP model predicts each mode's step from the FLOPs it runs per image:
3 x the student's forward (forward + backward) plus the teacher's masked forward; student and teacher share this
machine's cores, so their FLOPs add up.
"""

from __future__ import annotations

import csv
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch

from benchmarks.config import BenchConfig, TrainPair
from benchmarks.timing import REPO
from maskedkd.flops import ViTShape, masked_forward_flops
from maskedkd.keep import num_keep

DATA = REPO / "data" / "cifar10-subset"
MODES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("no_kd", {"mode": "none"}),
    ("full_kd", {"mode": "kd", "strategy": "all", "keep": 1.0}),
    ("maskedkd_75", {"mode": "kd", "strategy": "sips", "keep": 0.75}),
    ("maskedkd_50", {"mode": "kd", "strategy": "sips", "keep": 0.5}),
    ("maskedkd_25", {"mode": "kd", "strategy": "sips", "keep": 0.25}),
    # the pixels through shared memory (the teacher on this host, started with --shared-memory): GPU script only
    ("maskedkd_50_shm", {"mode": "kd", "strategy": "sips", "keep": 0.5, "teacher_shared_memory": True}),
)
TRAIN_FLOPS_PER_FORWARD = 3  # forward + backward (two products per forward product)


def predicted_gflops(pair: TrainPair, num_classes: int) -> dict[str, float]:
    """FLOP-model GFLOPs per training image of each mode."""
    student = timm.create_model(pair.student, pretrained=False, **{**pair.student_kwargs, "num_classes": num_classes})
    teacher = timm.create_model(pair.teacher.timm_name, pretrained=False, **pair.teacher.kwargs)
    s_shape, t_shape = ViTShape.from_model(student), ViTShape.from_model(teacher)
    student_g = TRAIN_FLOPS_PER_FORWARD * masked_forward_flops(s_shape, s_shape.num_patches).total / 1e9
    out = {}
    for name, opts in MODES:
        if opts["mode"] == "none":
            out[name] = student_g
        else:
            kept = num_keep(float(opts["keep"]), t_shape.num_patches)
            out[name] = student_g + masked_forward_flops(t_shape, kept).total / 1e9
    return out


def _step_times(out: Path, skip: int) -> list[float]:
    with (out / "metrics_steps.csv").open() as f:
        rows = list(csv.DictReader(f))
    times = [float(r["step_s"]) for r in rows]
    return times[skip:] or times


def timed_run(
    pair: TrainPair,
    server: Any,
    opts: dict[str, Any],
    out: Path,
    *,
    steps: tuple[int, int],
    batch_size: int,
    threads: int,
    device: str = "cpu",
    what: str = "training run",
) -> tuple[list[float], dict[str, Any]]:
    """One run of `pair`'s student in this process (`run_training`, one worker, seed 0, no evaluation) with the
    settings `opts` (mode, strategy, keep, micro_batches, ...) against `server` (unless mode none), for `steps` =
    (warm-up, timed) steps: the step times after the warm-up and the run's summary. RuntimeError "<what> failed"
    when it failed."""
    from student_client.config import TrainConfig
    from student_client.training.context import LocalContext
    from student_client.training.train_loop import run_training

    kd = opts["mode"] != "none"
    train_cfg = TrainConfig(
        data=str(DATA),
        out=str(out),
        student=pair.student,
        student_kwargs=dict(pair.student_kwargs),
        teacher=server.address if kd else None,
        api_key=server.api_key if kd else None,
        batch_size=batch_size,
        max_steps=sum(steps),
        threads_per_worker=threads,
        eval=False,
        progress=False,
        seed=0,
        **opts,
    )
    summary = run_training(train_cfg, LocalContext(torch.device(device)))
    if summary.get("fatal_error"):
        raise RuntimeError(f"{what} failed: {summary['fatal_error']}")
    return _step_times(out, steps[0]), summary


def run_mode(
    pair: TrainPair, server: Any, opts: dict[str, Any], cfg: BenchConfig, out: Path, threads: int, device: str = "cpu"
) -> dict[str, Any]:
    steps = (cfg.train_warmup_steps, cfg.train_steps)
    run_opts = {"micro_batches": cfg.train_micro_batches, **opts}  # a mode may pipeline its own way
    times, summary = timed_run(
        pair, server, run_opts, out, steps=steps, batch_size=pair.batch_size, threads=threads, device=device
    )
    return {
        "step_s": statistics.median(times),
        "steps_timed": len(times),
        "min_step_s": min(times),
        "max_step_s": max(times),
        "teacher_gflops": summary.get("teacher_gflops", 0.0),
        "overlap": summary.get("overlap"),
    }


def compiled_key(teacher_key: str) -> str:
    """Server-pool key of the `--compile static` server of a teacher."""
    return f"{teacher_key}-compiled"


def run_modes(
    pair: TrainPair,
    server: Any,
    names: tuple[str, ...],
    cfg: BenchConfig,
    workdir: Path,
    threads: int,
    predicted: dict[str, float],
    device: str = "cpu",
    *,
    more: Sequence[tuple[str, dict[str, Any], Any]] = (),
) -> dict[str, Any]:
    """`names` (full_kd among them) trained in turn on `device`, then the `more` modes (name, settings, their own
    server); each mode's step time against full KD's, and the FLOP model's prediction of that ratio (`predicted`
    names every mode)."""
    modes: dict[str, Any] = {}
    runs = [(name, opts, server) for name, opts in MODES if name in names] + list(more)
    try:
        for name, opts, served_by in runs:
            modes[name] = run_mode(pair, served_by, opts, cfg, workdir / name, threads, device)
    finally:
        torch.set_num_threads(threads)  # run_training sets the process-wide thread count
    full = modes["full_kd"]["step_s"]
    for name in modes:
        modes[name]["predicted_gflops_per_image"] = predicted[name]
        modes[name]["speedup_vs_full_kd"] = full / modes[name]["step_s"]
        modes[name]["predicted_speedup_vs_full_kd"] = predicted["full_kd"] / predicted[name]
        modes[name]["of_predicted"] = modes[name]["speedup_vs_full_kd"] / modes[name]["predicted_speedup_vs_full_kd"]
    return modes


def run_training_section(cfg: BenchConfig, pool: Any, workdir: Path, threads: int) -> dict[str, Any]:
    pairs = []
    for pair in cfg.train_pairs:
        predicted = predicted_gflops(pair, num_classes=10)
        modes = run_modes(
            pair,
            pool.get(pair.teacher.key),
            tuple(name for name, opts in MODES if not opts.get("teacher_shared_memory")),
            cfg,
            workdir / pair.key,
            threads,
            predicted,
        )
        compiled = None
        if pair.key in cfg.train_compiled_pairs:
            compiled = run_modes(
                pair,
                pool.get(compiled_key(pair.teacher.key)),
                cfg.train_compiled_modes,
                cfg,
                workdir / f"{pair.key}-compiled",
                threads,
                predicted,
            )
        pairs.append(
            {
                "pair": pair.key,
                "label": pair.label,
                "student": pair.student,
                "student_kwargs": pair.student_kwargs,
                "teacher": pair.teacher.timm_name,
                "teacher_kwargs": pair.teacher.kwargs,
                "batch_size": pair.batch_size,
                "warmup_steps": cfg.train_warmup_steps,
                "timed_steps": cfg.train_steps,
                "modes": modes,
                "compiled_modes": compiled,
            }
        )
    return {
        "pairs": pairs,
        "data": str(DATA.relative_to(REPO)),
        "threads": threads,
        "micro_batches": cfg.train_micro_batches,
        "flops_per_training_image": "3 x student forward + teacher masked forward (FLOP model)",
    }
