"""`student_client.train(cfg)`: one training run as `student-client train` runs it, from Python.

>>> from student_client import TrainConfig, train
>>> summary = train(TrainConfig(data="data/cifar10-subset", out="runs/s1", teacher="127.0.0.1:50051", api_key=key,
...                             student_kwargs={"img_size": 32, "patch_size": 4}, max_steps=20), local=True)
>>> summary["teacher_gflops"], summary["teacher_cost"], summary["val_top1"]

It returns the run's summary (also written to `<out>/summary.json`) and raises `TrainingError` (one line) when the run
stopped: a fatal teacher error (bad key, quota, bad input) or a failed worker group.
"""

from __future__ import annotations

from typing import Any

from student_client.config import TrainConfig
from student_client.training.ray_runner import TrainingError


def train(
    cfg: TrainConfig,
    *,
    local: bool = False,
    ray_address: str | None = None,
    worker_logs: bool = False,
    check: bool = True,
) -> dict[str, Any]:
    """Train per `cfg` on Ray Train (`cfg.workers` workers; a local Ray unless `ray_address`) or, with `local`, in
    this process as one worker without Ray. Returns the summary dict (steps, images, val_top1/5, teacher_gflops,
    teacher_full_gflops, teacher_saving, teacher_cost, teacher_requests, overlap, out, ...).

    `check` first runs the checks `student-client train` runs before Ray starts (data tree, student name and kwargs,
    a --resume checkpoint's fit, the teacher's address and key): a bad value raises `UsageError` in one line."""
    if check:
        from student_client.training.preflight import preflight

        preflight(cfg)
    if local:
        from student_client.training.context import LocalContext
        from student_client.training.train_loop import run_training

        summary = run_training(cfg, LocalContext())
        if summary.get("fatal_error"):
            raise TrainingError(str(summary["fatal_error"]))
        return summary
    from student_client.training.ray_runner import run_with_ray

    return run_with_ray(cfg, ray_address=ray_address, worker_logs=worker_logs)


__all__ = ["TrainingError", "train"]
