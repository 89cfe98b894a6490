"""The numbers of one training step, by name: this worker's sums (loss x images, images, teacher usage, ...) of a step
every worker finished, summed over every worker in one all-reduce after the optimizer step, then added into the run's
TrainState and the epoch's sums. Sums, not means, travel, so the totals of all workers come out of one reduction."""

from __future__ import annotations

import math

from student_client.collective import Collective, sum_over_workers
from student_client.distill.train_step import StepResult
from student_client.training.checkpointing import TrainState
from student_client.transport.wire import Usage

StepStats = dict[str, float]
STEP_STATS = (
    "loss",
    "ce",
    "kd",  # loss parts x images (means come from dividing by `images`)
    "feature",  # the --kd manifold|attention term x images
    "images",
    "gflops",
    "full_gflops",
    "cost",
    "requests",  # teacher usage, the probes' included
    "wait_s",
    "teacher_s",  # time the student waited for the teacher, and the teacher's time
    "mismatched",
    "rebilled",  # re-sent requests the teacher could not replay as sent (resend.py)
    "probe_gflops",
    "probe_cost",  # --keep auto's probes
    "kept",  # sum over images of the share of the teacher's patches answered from
)


def empty_stats() -> StepStats:
    """Every STEP_STATS number at 0 (an epoch's sums before its first step)."""
    return dict.fromkeys(STEP_STATS, 0.0)


def step_stats(result: StepResult, probe_usage: Usage, *, mismatched: int, rebilled: int) -> StepStats:
    """This worker's numbers of one step that every worker finished."""
    images, usage = result.images, result.usage + probe_usage
    return {
        "mismatched": float(mismatched),
        "rebilled": float(rebilled),
        "loss": float(result.loss.total.detach()) * images,
        "ce": float(result.loss.ce) * images,
        "kd": float(result.loss.kd) * images,
        "feature": 0.0 if result.loss.feature is None else float(result.loss.feature) * images,
        "images": float(images),
        "gflops": usage.gflops,
        "full_gflops": usage.full_gflops,
        "cost": usage.cost,
        "requests": float(usage.requests),
        "wait_s": result.stats.wait_s,
        "teacher_s": result.stats.teacher_s,
        "probe_gflops": probe_usage.gflops,
        "probe_cost": probe_usage.cost,
        "kept": result.kept,
    }


def sum_step_over_workers(ctx: Collective, stats: StepStats) -> StepStats:
    """Every STEP_STATS number summed over the workers (one all-reduce). A collective."""
    return sum_over_workers(ctx, stats, STEP_STATS)


def diverged(stats: StepStats, *, epoch: int, step: int) -> str | None:
    """The run's fatal error when a step's loss (summed over the workers, so every worker sees it) is NaN or
    infinite, else None. A diverged student still asks the teacher for every step's answers, each billed, and can
    learn nothing from them; stopping at the first such step pays for that step alone."""
    loss = stats["loss"]
    if math.isfinite(loss):
        return None
    return (
        f"the training loss became {loss} at step {step} (epoch {epoch + 1}): the run stopped there so that a "
        "diverged student pays for no more teacher calls, and saved no weights since its last checkpoint "
        "(a lower --lr may help)"
    )


def add_stats(total: StepStats, stats: StepStats) -> None:
    """Add one step's numbers into `total` (an epoch's)."""
    for name, value in stats.items():
        total[name] = total.get(name, 0.0) + value


def account_step(state: TrainState, stats: StepStats, batches_into_epoch: int) -> None:
    """One optimizer step done: its numbers (summed over the workers) into the run's counters."""
    state.global_step += 1
    state.batches_into_epoch = batches_into_epoch
    state.images_seen += int(stats["images"])
    state.teacher_gflops += stats["gflops"]
    state.teacher_full_gflops += stats["full_gflops"]
    state.teacher_cost += stats["cost"]
    state.teacher_requests += int(stats["requests"])
    state.teacher_mismatched_requests += int(stats["mismatched"])
    state.teacher_rebilled_requests += int(stats["rebilled"])
    state.probe_gflops += stats["probe_gflops"]
    state.probe_cost += stats["probe_cost"]
    state.kept += stats["kept"]
