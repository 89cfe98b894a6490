"""The reproduction's runs: the teacher (the committed one, evaluated once, or trained here), each student run
through `student-client train` against the reproduction's teacher server, and their evaluation on the test split."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from experiments import committed_runs
from experiments.configs import Method, ReproConfig
from experiments.datasets import DataError
from experiments.services import ReproductionServer, train
from student_client.command import train_argv

REPO = Path(__file__).resolve().parents[1]
RESULT = committed_runs.RESULT


def eval_device(cfg: ReproConfig) -> str:
    import torch

    return "cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu"


def evaluate(run_dir: Path, data: Path, cfg: ReproConfig) -> dict[str, Any]:
    from student_client.training.evaluate import evaluate_checkpoint

    acc = evaluate_checkpoint(run_dir, data, split="test", batch_size=256, device=eval_device(cfg))
    return {"top1": acc.top1, "top5": acc.top5, "images": acc.images}


def train_run(
    cfg: ReproConfig,
    recipe: Any,
    method: Method,
    seed: int,
    run_dir: Path,
    data: Path,
    threads: int,
    server: ReproductionServer | None,
) -> float:
    # Any earlier attempt, even one stopped before its first checkpoint, is resumed: --resume keeps its run id, so the
    # requests it already paid for are re-sent under the same ids and replayed by the server, not billed again.
    from student_client.determinism import RUN_ID_FILE

    resume = (run_dir / "checkpoints").is_dir() or (run_dir / RUN_ID_FILE).is_file()
    kd = method.mode != "none"
    assert not kd or server is not None
    cmd = train_argv(  # `student-client train ...` for one run (in-process, one worker: `--local`)
        local=True,
        data=data,
        out=run_dir,
        student=recipe.arch,
        student_kwargs=recipe.kwargs,
        epochs=recipe.epochs,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        weight_decay=recipe.weight_decay,
        warmup_epochs=recipe.warmup_epochs,
        augment=recipe.augment,
        mode=method.mode,
        keep=method.keep,
        strategy=method.strategy,
        seed=seed,
        device=cfg.device,
        threads_per_worker=threads,
        micro_batches=cfg.micro_batches,
        lambda_kd=cfg.lambda_kd,
        tau=cfg.tau if method.tau is None else method.tau,
        eval=False,
        progress=False,
        max_steps=recipe.max_steps,
        keep_mass=method.keep_mass,
        kd=None if method.kd == "logit" else method.kd,
        teacher=server.address if kd and server else None,
        resume=resume,
    )
    key = server.run_key(run_dir) if kd and server else None
    return train(cmd, run_dir / "train.log", api_key=key)


def teacher_checkpoint(cfg: ReproConfig, out: Path) -> Path:
    """The committed teacher of the config, else the one this run trains under OUT/teacher."""
    return REPO / cfg.teacher_checkpoint if cfg.teacher_checkpoint else out / "teacher" / "model.safetensors"


def ensure_teacher(cfg: ReproConfig, data: Path, teacher_data: Path, out: Path, threads: int) -> dict[str, Any]:
    teacher_dir = out / "teacher"
    if (teacher_dir / RESULT).exists():
        return json.loads((teacher_dir / RESULT).read_text())
    teacher_dir.mkdir(parents=True, exist_ok=True)
    if cfg.teacher_checkpoint:
        path = teacher_checkpoint(cfg, out)
        if not path.is_file():
            raise DataError(f"the config's teacher {path} is missing (models/README.md says how it is made)")
        result = {"method": "teacher", **evaluate(path, data, cfg), "train_wall_s": None, "checkpoint": str(path)}
        (teacher_dir / RESULT).write_text(json.dumps(result, indent=2))
        print(f"[repro] teacher {path.name}: top-1 {result['top1']:.2f}% on the test split", flush=True)
        return result
    print(
        f"[repro] training the teacher ({cfg.teacher.arch} {cfg.teacher.kwargs}, {cfg.teacher.epochs} epochs)",
        flush=True,
    )
    plain = Method("teacher", "teacher", "none", 1.0, "all")
    wall = train_run(cfg, cfg.teacher, plain, 0, teacher_dir, teacher_data, threads, None)
    result = {
        "method": "teacher",
        **evaluate(teacher_dir, data, cfg),
        "train_wall_s": wall,
        "checkpoint": str(teacher_dir / "model.safetensors"),
    }
    (teacher_dir / RESULT).write_text(json.dumps(result, indent=2))
    print(f"[repro] teacher: top-1 {result['top1']:.2f}% in {wall / 60:.1f} min", flush=True)
    return result


def thread_counts(cfg: ReproConfig) -> tuple[int, int]:
    """(threads of a run without a teacher, student threads while the teacher server computes beside it), each run's
    share when `cfg.parallel` runs train at once."""
    cpus = os.cpu_count() or 1
    alone = cfg.threads or max(1, cpus // cfg.parallel)
    beside = cfg.kd_threads or max(1, (cpus - cfg.server_threads if cfg.server_threads else cpus) // cfg.parallel)
    return alone, beside


def run_student(
    cfg: ReproConfig, method: Method, seed: int, data: Path, out: Path, server: ReproductionServer | None
) -> dict[str, Any]:
    run_dir = out / "runs" / f"{method.key}-s{seed}"
    alone, beside = thread_counts(cfg)
    threads = alone if method.mode == "none" else beside
    wall = train_run(cfg, cfg.student, method, seed, run_dir, data, threads, server)
    summary = json.loads((run_dir / "summary.json").read_text())
    zero = {"requests": 0.0, "images": 0.0, "gflops": 0.0, "full_gflops": 0.0, "cost": 0.0}
    ledger = server.run_usage(run_dir) if server is not None and method.mode != "none" else zero
    result = {
        "method": method.key,
        "seed": seed,
        **evaluate(run_dir, data, cfg),
        "ledger": ledger,
        "client_gflops": summary.get("teacher_gflops", 0.0),
        "steps": summary.get("global_step"),
        "train_wall_s": wall,
        "probe_gflops": summary.get("probe_gflops", 0.0),
        "keep_decisions": summary.get("keep_decisions", []),
        "kept_fraction": summary.get("kept_fraction"),
        "machine": committed_runs.machine(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (run_dir / RESULT).write_text(json.dumps(result, indent=2))
    return result


def collect(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob(f"*/{RESULT}"))]
