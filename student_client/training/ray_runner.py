"""Launching `train_worker` on Ray Train: TorchTrainer, ScalingConfig, FailureConfig, Ray checkpoints.

Without `ray_address`, a local Ray starts with one CPU per core (no dashboard). A failed worker group is restarted up
to `max_failures` times from the last checkpoint it reported (`ray.train.get_checkpoint()` in the worker).

On a cluster: Ray Train keeps the checkpoints under `<storage>/maskedkd-<run id>/` (`--storage`, shared by every node
or a URI; default `<out>/ray`); the run id stays in the driver's `<out>/run_id`. `--resume` reuses the run id, so Ray
Train finds that directory again and hands its newest checkpoint to every worker, on any node. The driver's progress
bar, epoch lines and final summary come from `ray.train.report` (`ray_progress`); when rank 0 ran on another node,
the driver also writes `summary.json` and copies the newest `model.safetensors` from the storage into its `--out`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from maskedkd.text import first_line
from student_client.config import TrainConfig
from student_client.determinism import run_id_for
from student_client.errors import TeacherError


class TrainingError(RuntimeError):
    """Training stopped; str(err) is one line that says why."""


def _root_cause(exc: BaseException) -> BaseException:
    """The user exception inside Ray's wrappers (RayTaskError.cause, __cause__ chains)."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, TeacherError):
            return exc
        nxt = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(nxt, BaseException):
            break
        exc = nxt
    return exc


def describe_failure(err: BaseException) -> str:
    """One line for a failed fit(): the first worker's root exception."""
    failures = getattr(err, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        err = failures[min(failures)]
    controller = getattr(err, "controller_failure", None)
    if isinstance(controller, BaseException):
        err = controller
    root = _root_cause(err)
    if isinstance(root, TeacherError):
        return str(root)
    message = first_line(root)
    # RayTaskError strings start with the task name; keep the user's exception line when it is there.
    for line in str(root).splitlines()[::-1]:
        if line.strip() and not line.startswith(" ") and ":" in line:
            message = line.strip()
            break
    return message if message.startswith(type(root).__name__) else f"{type(root).__name__}: {message}"


TRAIN_EXTRA_HINT = (
    "Ray is not installed; `student-client train` without --local needs the train extra: "
    "pip install 'maskedkd-service[train]'"
)


def require_ray() -> None:
    """Raise TrainingError (one line naming the `train` extra) when Ray is not importable."""
    try:
        import ray  # noqa: F401 - is Ray installed
        import ray.train  # noqa: F401 - is Ray Train installed
    except ImportError as err:
        raise TrainingError(TRAIN_EXTRA_HINT) from err


def init_ray(address: str | None, workers: int, *, worker_logs: bool = False) -> bool:
    """Connect to `address` or start a local Ray; returns True when this call started it.

    Worker and controller logs stay in Ray's log files unless `worker_logs` (the driver shows our progress bar).
    """
    import ray

    if ray.is_initialized():
        return False
    level = logging.INFO if worker_logs else logging.ERROR
    if address:
        ray.init(address=address, logging_level=level, log_to_driver=worker_logs)
    else:
        ray.init(
            num_cpus=max(workers, os.cpu_count() or 1),
            include_dashboard=False,
            logging_level=level,
            log_to_driver=worker_logs,
        )
    return True


RUN_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of a run's checkpoints, in its run directory


def ray_run_name(run_id: str) -> str:
    """Ray Train's run directory under the storage: one per run id, so --resume finds it again."""
    return f"maskedkd-{run_id}"


def storage_path_of(cfg: TrainConfig) -> str:
    """--storage as Ray Train takes it: a URI as given, a local path absolute; default <out>/ray."""
    storage = cfg.storage or str(Path(cfg.out) / "ray")
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())


def stored_run(cfg: TrainConfig) -> str | None:
    """Where Ray Train keeps the checkpoints of the run id stored in --out, if it has any (for messages)."""
    run_id_file = Path(cfg.out) / "run_id"
    run_id = cfg.run_id or (run_id_file.read_text().strip() if run_id_file.is_file() else "")
    if not run_id:
        return None
    run_dir = f"{storage_path_of(cfg).rstrip('/')}/{ray_run_name(run_id)}"
    try:
        import pyarrow.fs

        fs, path = (
            pyarrow.fs.FileSystem.from_uri(run_dir) if "://" in run_dir else (pyarrow.fs.LocalFileSystem(), run_dir)
        )
        found = fs.get_file_info(f"{path}/{RUN_SNAPSHOT}").type != pyarrow.fs.FileType.NotFound
    except Exception:  # noqa: BLE001 - unreachable or unknown storage: Ray Train reports it when it starts
        return None
    return run_dir if found else None


def process_group_backend(*, use_gpu: bool) -> str:
    """The workers' torch.distributed backend. On GPUs NCCL reduces the gradients (DDP), and gloo the small host
    counters summed every step (`collective.summed_over_group`: a fatal error agreed before the backward, the step's
    numbers after it); with NCCL alone those would be copied to the card and back, each copy waiting for the work
    queued there, so the backward's launch would wait for the forward to have run."""
    return "cpu:gloo,cuda:nccl" if use_gpu else "gloo"


def run_with_ray(cfg: TrainConfig, *, ray_address: str | None = None, worker_logs: bool = False) -> dict[str, Any]:
    """Train on Ray; returns rank 0's final summary. Raises TrainingError (one line) on failure."""
    require_ray()
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from student_client.training.ray_progress import ReportedProgress

    launched = time.monotonic()
    started = init_ray(ray_address, cfg.workers, worker_logs=worker_logs)
    how = "started a local Ray" if started else f"connected to Ray at {ray_address or 'the running cluster'}"
    print(
        f"ray: {how} in {time.monotonic() - launched:.1f}s; starting {cfg.workers} worker"
        f"{'s' if cfg.workers > 1 else ''}",
        file=sys.stderr,
        flush=True,
    )
    out = Path(cfg.out).resolve()
    cfg.out = str(out)
    cfg.run_id = cfg.run_id or run_id_for(out, resume=cfg.resume)  # every worker, and every restart, uses this one
    cfg.storage = storage_path_of(cfg)
    driver_node = ray.get_runtime_context().get_node_id()
    reports = ReportedProgress(enabled=cfg.progress, started_at=launched)
    resources = {"CPU": 1.0, **({"GPU": 1.0} if cfg.use_gpu else {})}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=cfg.to_dict(),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend=process_group_backend(use_gpu=cfg.use_gpu)),
        run_config=RunConfig(
            name=ray_run_name(cfg.run_id),  # same run id (--resume): Ray Train restores its newest checkpoint
            storage_path=cfg.storage,
            callbacks=[reports.callback],  # type: ignore[list-item]  # Ray Train takes its UserCallback here too
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    summary_file = out / "summary.json"
    summary_file.unlink(missing_ok=True)
    on_sigint = signal.getsignal(signal.SIGINT)
    try:
        with reports:
            result = fit_interruptibly(trainer)
    except KeyboardInterrupt:
        # Ctrl-C: leaving the driver (ray.shutdown below, or exiting) ends the run's controller and workers; the
        # checkpoints in --out / --storage stay, so --resume continues from the newest one.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        raise
    except Exception as err:  # TrainingFailedError and friends
        raise TrainingError(describe_failure(err)) from err
    finally:
        if started:
            ray.shutdown()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, on_sigint)
    # rank 0's final report; Result.metrics only holds the last checkpoint's report
    if reports.final is not None:
        metrics = {"val_top1": None, "val_top5": None, "overlap": None, **reports.final}
    else:
        metrics = json.loads(summary_file.read_text()) if summary_file.is_file() else dict(result.metrics or {})
    if metrics.get("fatal_error"):
        raise TrainingError(str(metrics["fatal_error"]))
    if reports.nodes and reports.nodes[0] != driver_node:  # rank 0 wrote its --out on another machine
        _bring_home(out, metrics, result.checkpoint)
    return metrics


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point, one call per worker. Ray pickles it by reference and the run's controller unpickles it
    without calling it: the training loop is imported here when it runs, so the controller loads neither the loop nor
    timm (~3 s of CPU each run)."""
    from student_client.training.context import RayContext
    from student_client.training.train_loop import run_training

    run_training(TrainConfig.from_dict(config), RayContext())


def fit_interruptibly(trainer: Any) -> Any:
    """`trainer.fit()` on a helper thread, so Ctrl-C raises KeyboardInterrupt here. (On the main thread Ray Train
    installs its own SIGINT handler, which aborts the run and then exits the process with no message.)"""
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # noqa: BLE001 - handed to the main thread
            outcome["error"] = err

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.2)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _bring_home(out: Path, summary: dict[str, Any], checkpoint: Any) -> None:
    """summary.json from the final report and the newest weights from the storage, into the driver's --out."""
    import tempfile

    from student_client.training.checkpointing import MODEL_FILE

    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if checkpoint is None:
        return
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        checkpoint.to_directory(tmp)
        if (Path(tmp) / MODEL_FILE).is_file():
            (Path(tmp) / MODEL_FILE).replace(out / MODEL_FILE)
