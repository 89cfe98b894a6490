"""The per-worker training function: `run_training(cfg, RayContext())` on each Ray Train worker (ray_runner's
`train_worker`), or in-process (`run_training(cfg, LocalContext())`). Model, data and the TeacherClient are built
inside the worker (train_run).

A run is: build it (train_run.build_training_run), then epochs of train steps, each epoch ended by an evaluation, its
metrics row and a checkpoint, then the summary (train_report.finish_run). Every step all workers first agree whether
any hit a fatal teacher error (bad key, quota, bad input), which stops every worker at the same step, cleanly, instead
of being retried by Ray's FailureConfig like a crash would be; after the optimizer step they sum one small set of named
numbers (loss, images, teacher usage: train_stats) in one all-reduce, so the progress bar and the cost figures cover
all workers, and every worker stops after the same step when that loss is NaN or infinite (a diverged run would keep
paying the teacher).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from maskedkd.host_memory import tune_allocator
from student_client.collective import agree_on_error, sum_over_workers
from student_client.config import TrainConfig
from student_client.data import unit_pixels
from student_client.determinism import seed_everything, step_seed
from student_client.distill.keep_probe import decision_line
from student_client.distill.train_step import StepResult
from student_client.errors import FATAL_ERRORS
from student_client.student import unwrap
from student_client.training.checkpointing import TrainState
from student_client.training.context import Context
from student_client.training.evaluate import Accuracy, count_correct
from student_client.training.train_report import RunLog, epoch_row, finish_run, step_row
from student_client.training.train_run import RunRefusedError, TrainingRun, build_training_run
from student_client.training.train_stats import (
    StepStats,
    account_step,
    add_stats,
    diverged,
    empty_stats,
    step_stats,
    sum_step_over_workers,
)
from student_client.transport.wire import Usage


def run_training(cfg: TrainConfig, ctx: Context) -> dict[str, Any]:
    """Train per `cfg`; returns the final summary (also reported to Ray and written to out/summary.json)."""
    torch.set_num_threads(max(1, cfg.threads_per_worker))
    tune_allocator()  # each request's MB of pixels from a reused heap, not pages mapped and faulted in anew
    torch.manual_seed(cfg.seed + ctx.rank)
    started = time.perf_counter()
    try:
        run = build_training_run(cfg, ctx)
    except RunRefusedError as refused:
        return finish_run(cfg, ctx, refused.state, fatal_error=refused.message, started=started)
    state = run.state
    fatal: str | None = None
    accuracy: Accuracy | None = None
    log = RunLog(cfg, ctx, state, planned=run.planned_steps, resumed=run.resumed)
    try:
        while fatal is None and state.epochs_done < cfg.epochs and not _done(cfg, state):
            epoch, epoch_started, sums = state.epochs_done, time.perf_counter(), empty_stats()
            fatal = _train_epoch(run, log, epoch, sums)
            if fatal is None:
                accuracy = _end_epoch(run, log, epoch, sums, epoch_started)
    finally:
        log.close()
        run.close()
    return finish_run(cfg, ctx, state, fatal_error=fatal, started=started, accuracy=accuracy)


def _train_epoch(run: TrainingRun, log: RunLog, epoch: int, sums: StepStats) -> str | None:
    """The steps of `epoch` from where the run stands (a resumed run skips the batches it did); each step's numbers
    are added into `sums`. Returns a fatal error agreed by every worker, or None."""
    run.data.sampler.set_epoch(epoch)
    run.data.train_set.set_epoch(epoch)
    run.kd.runner.prefix = run.request_prefix(epoch)  # ids <run>-e<epoch>-w<rank>-s<step>-m<micro>
    done_before = run.state.batches_into_epoch
    for index, (images, targets) in enumerate(run.data.loader):
        if index < done_before:
            continue
        if _done(run.cfg, run.state):
            break
        fatal = _train_step(run, log, epoch, index, images, targets, sums)
        if fatal is not None:
            return fatal
    return None


def _train_step(
    run: TrainingRun, log: RunLog, epoch: int, index: int, images: torch.Tensor, targets: torch.Tensor, sums: StepStats
) -> str | None:
    """One optimizer step on batch `index` of `epoch`, its numbers (summed over the workers) added into `sums`.
    Returns the fatal error every worker stops on, or None: a teacher's (then nothing was stepped), or a loss that
    is not finite (the step is accounted: its teacher calls were billed)."""
    cfg, ctx, state, kd = run.cfg, run.ctx, run.state, run.kd
    _maybe_inject_failure(cfg, ctx, state)
    step_started = time.perf_counter()
    images, targets = images.to(ctx.device, non_blocking=True), targets.to(ctx.device, non_blocking=True)  # pinned
    images = unit_pixels(images)  # [B, C, H, W] float in [0, 1], made on the device from the loader's uint8
    seed_everything(step_seed(cfg.seed, epoch, state.global_step, ctx.rank, "global"))  # mixup, dropout
    kd.seed_selection(step_seed(cfg.seed, epoch, state.global_step, ctx.rank, "select"))
    mismatched_before, rebilled_before = run.refused_requests()
    if run.mixup is not None:
        images, targets = run.mixup(images, targets)
    decided = kd.decide_keep_if_due(
        ctx, images, step=state.global_step, prefix=kd.runner.prefix, decided_before=bool(state.keep_decisions)
    )
    if decided is not None and decided.error is not None:
        return decided.error  # agreed by every worker in the decision
    if decided is not None:
        log.decision(decision_line(decided.record))
    result: StepResult | None = None
    error: str | None = None
    try:
        result = kd.runner(images, targets, state.global_step, known=None if decided is None else decided.known)
    except FATAL_ERRORS as err:
        error = str(err)
    mismatched, rebilled = run.refused_requests()
    if (fatal := agree_on_error(ctx, error)) is not None:  # before the backward: DDP's is a collective
        return fatal
    assert result is not None
    run.optimizer.zero_grad(set_to_none=True)
    result.loss.total.backward()
    run.optimizer.step()
    run.scheduler.step()
    # Read after the optimizer step: reading the loss sooner would hold the backward's launch behind the forward on
    # a GPU (a host sync), where it now waits only at the end of the step.
    stats = sum_step_over_workers(
        ctx,
        step_stats(
            result,
            Usage() if decided is None else decided.usage,
            mismatched=mismatched - mismatched_before,
            rebilled=rebilled - rebilled_before,
        ),
    )
    add_stats(sums, stats)
    account_step(state, stats, index + 1 if index + 1 < run.steps_per_epoch else 0)
    if decided is not None:
        state.keep_decisions.append(decided.record)
    row = step_row(state, stats, epoch, time.perf_counter() - step_started, run.optimizer.param_groups[0]["lr"])
    if kd.prober is not None and kd.selector is not None:
        row.update(keep_strategy=kd.selector.strategy, keep=kd.selector.keep)
    log.step(state, row)
    return diverged(stats, epoch=epoch, step=state.global_step)


def _end_epoch(run: TrainingRun, log: RunLog, epoch: int, sums: StepStats, epoch_started: float) -> Accuracy | None:
    """After an epoch's steps (or a --max-steps stop inside it): evaluation, the epoch's row, then (rank 0) a
    checkpoint; every worker reports it to Ray Train (a sync point). Returns the accuracy (None without eval)."""
    state = run.state
    if state.batches_into_epoch == 0:  # else max_steps stopped it mid-epoch; a resume continues there
        state.epochs_done += 1
    accuracy = _evaluate(run)
    row = epoch_row(state, sums, epoch, time.perf_counter() - epoch_started, accuracy)
    state.history.append(row)
    if accuracy is not None:
        state.best_top1 = max(state.best_top1 or 0.0, accuracy.top1)
    log.epoch(row)
    checkpoint = run.save_checkpoint(row) if run.ctx.rank == 0 else None
    log.report_epoch(row, state, checkpoint)
    return accuracy


def _evaluate(run: TrainingRun) -> Accuracy | None:
    """Top-1 / top-5 over every worker's shard of the evaluation set (None without one)."""
    if run.data.eval_loader is None:
        return None
    own = count_correct(unwrap(run.model), run.data.eval_loader, run.normalize, run.ctx.device)
    names = ("top1_correct", "top5_correct", "images")
    total = sum_over_workers(run.ctx, {name: getattr(own, name) for name in names}, names)
    return Accuracy(*(int(total[name]) for name in names))


def _maybe_inject_failure(cfg: TrainConfig, ctx: Context, state: TrainState) -> None:
    """Recovery testing: crash rank 0 once at step `fail_at_step` (a marker file makes it happen only once)."""
    if cfg.fail_at_step is None or ctx.rank != 0 or state.global_step != cfg.fail_at_step:
        return
    marker = Path(cfg.out) / ".failure_injected"
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(state.global_step))
        raise RuntimeError(f"injected failure at step {state.global_step}")


def _done(cfg: TrainConfig, state: TrainState) -> bool:
    return cfg.max_steps is not None and state.global_step >= cfg.max_steps
