"""Training checkpoints: one directory per save with

- `model.safetensors`: the student's weights plus `model_name`/`model_kwargs` in the header
  (`maskedkd.checkpoints` format, so `teacher-server serve --checkpoint` loads it with no extra flags);
- `train_state.pt`: optimizer, scheduler, epoch/step counters and the teacher usage so far (`--resume` restores it).

Layout under `--out`: `checkpoints/epoch_0003/`, `checkpoints/step_000120/` (a run stopped mid-epoch), and
`model.safetensors`, a copy of the newest weights.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from maskedkd.checkpoints import CheckpointError, load_state_dict, read_checkpoint_meta, save_model_checkpoint
from maskedkd.text import one_line

MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"


@dataclass
class TrainState:
    epochs_done: int = 0  # completed epochs
    global_step: int = 0  # optimizer steps so far
    batches_into_epoch: int = 0  # steps already done in epoch `epochs_done` (a run stopped mid-epoch)
    images_seen: int = 0
    teacher_gflops: float = 0.0  # billed so far, summed over workers
    teacher_full_gflops: float = 0.0  # what the full teacher would have cost
    teacher_cost: float = 0.0
    teacher_requests: int = 0
    teacher_mismatched_requests: int = 0  # re-sent requests the teacher could not replay as sent (resend.py)
    teacher_rebilled_requests: int = 0  # of those, billed again under a derived id
    precision: str = ""  # bf16 | fp32, resolved at the run's start and kept by --resume
    best_top1: float | None = None
    probe_gflops: float = 0.0  # --keep auto: what the probes cost (part of teacher_gflops / _cost)
    probe_cost: float = 0.0
    kept: float = 0.0  # sum over images of the share of the teacher's patches each was answered from
    keep_decisions: list[dict[str, Any]] = field(default_factory=list)  # --keep auto: one per decision, in order
    history: list[dict[str, Any]] = field(default_factory=list)  # per-epoch metrics


def checkpoint_name(state: TrainState) -> str:
    if state.batches_into_epoch == 0:
        return f"epoch_{state.epochs_done:04d}"
    return f"step_{state.global_step:06d}"


def save_training_checkpoint(
    out_dir: str | Path,
    *,
    model: nn.Module,
    model_name: str,
    model_kwargs: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainState,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `out_dir/checkpoints/<name>/` and refresh `out_dir/model.safetensors`; returns the checkpoint dir."""
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints" / checkpoint_name(state)
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {"epochs_done": state.epochs_done, "global_step": state.global_step, **(extra or {})}
    save_model_checkpoint(tmp / MODEL_FILE, model, model_name=model_name, model_kwargs=model_kwargs, extra=meta)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler else None,
            "state": asdict(state),
        },
        tmp / STATE_FILE,
    )
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    tmp.replace(ckpt_dir)
    latest = out_dir / MODEL_FILE
    shutil.copyfile(ckpt_dir / MODEL_FILE, latest.with_suffix(".tmp"))
    latest.with_suffix(".tmp").replace(latest)
    return ckpt_dir


def _step_of(path: Path) -> int:
    """Sort key: the global step in the weights' header (cheap to read; directory names mix epochs and steps)."""
    try:
        meta = read_checkpoint_meta(path / MODEL_FILE)
        return int(meta.extra["global_step"]) if meta else -1
    except (CheckpointError, KeyError, ValueError):
        return -1


def _checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoint directories under `root`, oldest first."""
    if not root.is_dir():
        return []
    dirs = [
        p
        for p in root.iterdir()
        if p.is_dir() and not p.name.endswith(".tmp") and (p / MODEL_FILE).is_file() and (p / STATE_FILE).is_file()
    ]
    return sorted(dirs, key=lambda p: (_step_of(p), p.stat().st_mtime))


def prune_checkpoints(out_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoint directories."""
    if keep < 1:
        return
    for old in _checkpoint_dirs(Path(out_dir) / "checkpoints")[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory under `out_dir/checkpoints`, or None."""
    dirs = _checkpoint_dirs(Path(out_dir) / "checkpoints")
    return dirs[-1] if dirs else None


def load_training_checkpoint(
    ckpt_dir: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None
) -> TrainState:
    """Load weights into `model` (strict), and optimizer/scheduler state when given; returns the TrainState."""
    ckpt_dir = Path(ckpt_dir)
    weights = ckpt_dir / MODEL_FILE
    if not weights.is_file() or not (ckpt_dir / STATE_FILE).is_file():
        raise CheckpointError(f"{ckpt_dir} is not a training checkpoint (needs {MODEL_FILE} and {STATE_FILE})")
    try:
        model.load_state_dict(load_state_dict(weights), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {weights} does not fit the student: {one_line(exc)}") from exc
    blob = torch.load(ckpt_dir / STATE_FILE, map_location="cpu", weights_only=False)
    if optimizer is not None:
        optimizer.load_state_dict(blob["optimizer"])
    if scheduler is not None and blob.get("scheduler") is not None:
        scheduler.load_state_dict(blob["scheduler"])
    return TrainState(**blob["state"])


def resolve_model_file(path: str | Path) -> Path:
    """A .safetensors/.pt file, a checkpoint directory, or a training --out directory -> the weights file."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / MODEL_FILE).is_file():
        return path / MODEL_FILE
    raise CheckpointError(f"no checkpoint at {path} (expected a weights file or a directory with {MODEL_FILE})")
