"""What a worker's run starts from, and what a resumed run must keep: the checkpoint Ray restored after a worker
failure, else with --resume the newest in --out; the same checkpoint on every worker, and the settings that decide
the images under each request id."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from student_client.config import TrainConfig
from student_client.training.checkpointing import TrainState, latest_checkpoint, load_training_checkpoint
from student_client.training.context import Context

# What decides which images a request id carries: a resume must keep them (its re-sent ids may take the answers
# billed under them, student_client/transport/resend.py). `data` is compared by its last path component (a moved run
# may mount the same data elsewhere).
IMAGE_SETTINGS = ("data", "seed", "batch_size", "workers", "augment")


def restore(
    cfg: TrainConfig,
    ctx: Context,
    raw: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
) -> TrainState:
    """The checkpoint Ray restored after a worker failure, else with --resume the newest in --out, loaded into the
    student, optimizer and scheduler; a fresh TrainState without one."""
    with ctx.restored_checkpoint() as ray_checkpoint:
        source = ray_checkpoint or (latest_checkpoint(cfg.out) if cfg.resume else None)
        if source is None:
            return TrainState()
        return load_training_checkpoint(source, model=raw, optimizer=optimizer, scheduler=scheduler)


def resume_refusal(cfg: TrainConfig, ctx: Context, state: TrainState) -> str | None:
    """A one-line refusal when this worker's restored `state` must not train (collective: every rank calls it)."""
    resumed = state.global_step > 0
    return _mismatch(ctx, state) or (_changes_images(cfg, Path(cfg.out)) if resumed and ctx.rank == 0 else None)


def _changes_images(cfg: TrainConfig, out: Path) -> str | None:
    """A one-line refusal when --resume changes a setting that decides the images under each request id."""
    try:
        started_with = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return None  # a run from before config.json was written: nothing to compare
    now = json.loads(cfg.to_json())
    for name in IMAGE_SETTINGS:
        before, after = started_with.get(name), now.get(name)
        if name == "data" and before is not None and after is not None:
            before, after = Path(str(before)).name, Path(str(after)).name
        if before is not None and before != after:
            flag = "--" + name.replace("_", "-")
            return (
                f"--resume: this run was started with {flag} {before}, not {after}; its re-sent requests would "
                f"carry other images under the same ids: resume with {flag} {before}, or train into a new --out"
            )
    return None


def _mismatch(ctx: Context, state: TrainState) -> str | None:
    """Ranks that restored different checkpoints (a --resume from an --out that is not shared) must not train."""
    steps = ctx.all_gather_object(state.global_step)
    if len(set(steps)) <= 1:
        return None
    return (
        f"workers restored different checkpoints (global step by rank: {steps}): resume from --storage, or "
        "make --out a path shared by every node"
    )
