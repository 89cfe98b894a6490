"""What a training run tells: the rows of metrics_steps.csv and metrics_epochs.csv (from the step numbers of
train_stats), the progress bar and its lines, the reports to Ray Train, and summary.json. Rank 0 writes the files and
draws the bar (in-process runs; a Ray run's driver draws it from the reports); every rank reports to Ray Train."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from student_client.config import TrainConfig
from student_client.training.checkpointing import TrainState
from student_client.training.context import Context
from student_client.training.evaluate import Accuracy
from student_client.training.metrics import MetricsWriter, Progress, epoch_line
from student_client.training.train_stats import StepStats


def _overlap(stats: StepStats) -> float | str:
    """The share of the teacher's time hidden behind the student's ("" without teacher time)."""
    return 1 - stats["wait_s"] / stats["teacher_s"] if stats["teacher_s"] > 0 else ""


def step_row(state: TrainState, stats: StepStats, epoch: int, step_s: float, lr: float) -> dict[str, Any]:
    """The metrics_steps.csv row of the step just accounted into `state` (stats: summed over the workers)."""
    n = max(1.0, stats["images"])
    return {
        "step": state.global_step,
        "epoch": epoch,
        "loss": stats["loss"] / n,
        "ce": stats["ce"] / n,
        "kd": stats["kd"] / n,
        "feature": stats["feature"] / n,
        "lr": lr,
        "images": int(stats["images"]),
        "img_per_s": stats["images"] / max(step_s, 1e-9),
        "step_s": step_s,
        "teacher_gflops": stats["gflops"],
        "teacher_full_gflops": stats["full_gflops"],
        "teacher_cost": stats["cost"],
        "total_teacher_gflops": state.teacher_gflops,
        "total_saved_gflops": state.teacher_full_gflops - state.teacher_gflops,
        "overlap": _overlap(stats),
        "teacher_wait_s": stats["wait_s"],
        "probe_gflops": stats["probe_gflops"],
        "probe_cost": stats["probe_cost"],
        "kept_fraction": stats["kept"] / n,
    }


def epoch_row(
    state: TrainState, sums: StepStats, epoch: int, epoch_s: float, accuracy: Accuracy | None
) -> dict[str, Any]:
    """The metrics_epochs.csv row of an epoch (sums: its steps', over the workers)."""
    n = max(1.0, sums["images"])
    return {
        "epoch": epoch,
        "step": state.global_step,
        "train_loss": sums["loss"] / n,
        "train_ce": sums["ce"] / n,
        "train_kd": sums["kd"] / n,
        "train_feature": sums["feature"] / n,
        "val_top1": accuracy.top1 if accuracy else "",
        "val_top5": accuracy.top5 if accuracy else "",
        "images": int(sums["images"]),
        "epoch_s": epoch_s,
        "teacher_gflops": sums["gflops"],
        "teacher_full_gflops": sums["full_gflops"],
        "teacher_cost": sums["cost"],
        "teacher_saving": 1 - sums["gflops"] / sums["full_gflops"] if sums["full_gflops"] else "",
        "overlap": _overlap(sums),
    }


def _reported(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if v != ""}


class RunLog:
    """The metrics files, progress bar and Ray reports of one worker's run, from its start to `close`."""

    def __init__(self, cfg: TrainConfig, ctx: Context, state: TrainState, *, planned: int, resumed: bool) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.is_main = ctx.rank == 0
        out = Path(cfg.out)
        self.writer = MetricsWriter(out, resume_step=state.global_step if resumed else None) if self.is_main else None
        if self.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(cfg.to_json())
        initial = min(state.global_step, planned)
        if ctx.under_ray:  # the driver's progress bar starts from this report
            ctx.report({"kind": "start", "total": planned, "initial": initial})
        self.progress = Progress(planned, initial, enabled=self.is_main and cfg.progress and not ctx.under_ray)

    def line(self, text: str) -> None:
        """A line on stderr, above the bar (rank 0)."""
        if self.is_main:
            self.progress.write(text)

    def decision(self, text: str) -> None:
        """A `--keep auto` decision's line: in-process on stderr (rank 0); under Ray reported by every worker (a
        decision is taken by all of them at the same step, and a report is a collective) and printed by the driver."""
        if self.ctx.under_ray:
            self.ctx.report({"kind": "line", "text": text})
        else:
            self.line(text)

    def step(self, state: TrainState, row: dict[str, Any]) -> None:
        """A step done: its CSV row every --log-every steps and the bar (rank 0); the driver's progress row every
        --progress-every steps (every rank: Ray's report is a collective)."""
        if self.is_main:
            if self.writer is not None and state.global_step % max(1, self.cfg.log_every) == 0:
                self.writer.log_step(row)
            self.progress.update(
                1,
                {
                    "loss": row["loss"],
                    "img_per_s": row["img_per_s"],
                    "gflops": state.teacher_gflops,
                    "saved": row["total_saved_gflops"],
                },
            )
        if self.ctx.under_ray and state.global_step % self.cfg.progress_every == 0:
            self.ctx.report({"kind": "step", **_reported(row)})

    def epoch(self, row: dict[str, Any]) -> None:
        """An epoch done: its CSV row and, in-process, its line (rank 0; a Ray run's driver prints the report)."""
        if self.writer is not None:
            self.writer.log_epoch(row)
            if not self.ctx.under_ray:
                self.progress.write(epoch_line(row))

    def report_epoch(self, row: dict[str, Any], state: TrainState, checkpoint_dir: Path | None) -> None:
        """The epoch (and rank 0's checkpoint) to Ray Train: every worker, a sync point."""
        self.ctx.report(_reported(row) | {"global_step": state.global_step, "kind": "epoch"}, checkpoint_dir)

    def close(self) -> None:
        self.progress.close()
        if self.writer is not None:
            self.writer.close()


def finish_run(
    cfg: TrainConfig,
    ctx: Context,
    state: TrainState,
    *,
    fatal_error: str | None,
    started: float,
    accuracy: Accuracy | None = None,
) -> dict[str, Any]:
    """The run's summary: written to out/summary.json (rank 0), reported to Ray Train as the final report, returned."""
    full, used = state.teacher_full_gflops, state.teacher_gflops
    summary: dict[str, Any] = {
        "fatal_error": fatal_error or "",
        "epochs_done": state.epochs_done,
        "global_step": state.global_step,
        "steps_into_epoch": state.batches_into_epoch,  # > 0: --max-steps stopped it inside epoch epochs_done + 1
        "images_seen": state.images_seen,
        "val_top1": accuracy.top1 if accuracy else None,
        "val_top5": accuracy.top5 if accuracy else None,
        "val_images": accuracy.images if accuracy else 0,
        "teacher_gflops": used,
        "teacher_full_gflops": full,
        "teacher_saved_gflops": full - used,
        "teacher_saving": (full - used) / full if full else 0.0,
        "teacher_cost": state.teacher_cost,
        "teacher_requests": state.teacher_requests,
        "teacher_mismatched_requests": state.teacher_mismatched_requests,
        "teacher_rebilled_requests": state.teacher_rebilled_requests,
        "precision": state.precision,
        "wall_s": time.perf_counter() - started,
        "mode": cfg.mode,
        "strategy": cfg.strategy,
        "keep": cfg.keep,
        "out": str(Path(cfg.out).resolve()),
        "overlap": _mean_overlap(state),
        "probe_gflops": state.probe_gflops,
        "probe_cost": state.probe_cost,
        "keep_decisions": state.keep_decisions,
        "kept_fraction": state.kept / max(1, state.images_seen),
    }
    if ctx.rank == 0:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "summary.json").write_text(json.dumps(summary, indent=2))
    ctx.report({k: v for k, v in summary.items() if v is not None} | {"final": True, "kind": "final"})
    return summary


def _mean_overlap(state: TrainState) -> float | None:
    values = [h["overlap"] for h in state.history if isinstance(h.get("overlap"), float)]
    return sum(values) / len(values) if values else None
