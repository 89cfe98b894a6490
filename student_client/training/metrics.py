"""Per-step and per-epoch metrics to CSV (and TensorBoard when installed), and the rank-0 progress bar of in-process
runs (a Ray run's driver draws its bar from the reports: `ray_progress`)."""

from __future__ import annotations

import csv
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

STEP_COLUMNS = (
    "step",
    "epoch",
    "loss",
    "ce",
    "kd",
    "feature",
    "lr",
    "images",
    "img_per_s",
    "step_s",
    "teacher_gflops",
    "teacher_full_gflops",
    "teacher_cost",
    "total_teacher_gflops",
    "total_saved_gflops",
    "overlap",
    "teacher_wait_s",
    "keep_strategy",
    "keep",
    "probe_gflops",
    "probe_cost",
    "kept_fraction",
    "time",
)
EPOCH_COLUMNS = (
    "epoch",
    "step",
    "train_loss",
    "train_ce",
    "train_kd",
    "train_feature",
    "val_top1",
    "val_top5",
    "images",
    "epoch_s",
    "teacher_gflops",
    "teacher_full_gflops",
    "teacher_cost",
    "teacher_saving",
    "overlap",
    "time",
)


def utc_now_iso() -> str:
    """The time as ISO 8601 in UTC with milliseconds: 2026-11-29T15:31:02.123Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _CsvLog:
    """A CSV file of rows with a `step` column. `resume_step`: keep the rows up to that step (a resumed run redoes
    the later ones, so every step appears once); None: start a new file."""

    def __init__(self, path: Path, columns: tuple[str, ...], resume_step: int | None) -> None:
        kept = _rows_up_to(path, resume_step) if resume_step is not None else []
        self._file = path.open("w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=columns, extrasaction="ignore")
        self._writer.writeheader()
        self._writer.writerows(kept)
        self._file.flush()

    def write(self, row: dict[str, Any]) -> None:
        self._writer.writerow({k: _fmt(v) for k, v in row.items()})
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _rows_up_to(path: Path, step: int) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [row for row in csv.DictReader(f) if _int(row.get("step")) <= step]


def _int(text: str | None) -> float:
    try:
        return int(text or "")
    except ValueError:
        return float("inf")  # a torn last line of a killed run: dropped


def _fmt(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v


class MetricsWriter:
    """`out/metrics_steps.csv`, `out/metrics_epochs.csv`, and `out/tensorboard/` when tensorboard is installed."""

    def __init__(self, out_dir: str | Path, *, resume_step: int | None) -> None:
        """`resume_step`: the restored checkpoint's global step (rows after it are dropped); None: fresh files."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.steps = _CsvLog(out / "metrics_steps.csv", STEP_COLUMNS, resume_step)
        self.epochs = _CsvLog(out / "metrics_epochs.csv", EPOCH_COLUMNS, resume_step)
        self._tb: Any = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out / "tensorboard"))
        except Exception:  # noqa: BLE001 - tensorboard not installed: CSV only
            self._tb = None

    def log_step(self, row: dict[str, Any]) -> None:
        row = {"time": utc_now_iso(), **row}
        self.steps.write(row)
        if self._tb is not None:
            for k in ("loss", "ce", "kd", "lr", "img_per_s", "total_teacher_gflops", "overlap"):
                if isinstance(row.get(k), (int, float)):
                    self._tb.add_scalar(f"step/{k}", row[k], row["step"])

    def log_epoch(self, row: dict[str, Any]) -> None:
        row = {"time": utc_now_iso(), **row}
        self.epochs.write(row)
        if self._tb is not None:
            for k in ("train_loss", "val_top1", "val_top5", "teacher_gflops", "teacher_saving", "overlap"):
                if isinstance(row.get(k), (int, float)):
                    self._tb.add_scalar(f"epoch/{k}", row[k], row["epoch"])

    def close(self) -> None:
        self.steps.close()
        self.epochs.close()
        if self._tb is not None:
            self._tb.close()


class Progress:
    """The tqdm bar of an in-process run (rank 0): loss, img/s, teacher GFLOPs used and saved; tqdm adds the ETA.
    `write` prints a line (an epoch's) on stderr above the bar, also when the bar is off."""

    def __init__(self, total: int, initial: int, *, enabled: bool) -> None:
        self._bar: Any = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def update(self, n: int, info: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(progress_text(info), refresh=False)
            self._bar.update(n)

    def write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def epoch_line(row: dict[str, Any], node: str | None = None) -> str:
    """One line per finished epoch: its step, train loss, validation accuracy and teacher GFLOPs."""
    val = (
        f", val top-1 {float(row['val_top1']):.2f}% top-5 {float(row['val_top5']):.2f}%"
        if row.get("val_top1") not in (None, "")
        else ""
    )
    where = f" (reported by rank 0 on node {node[:12]})" if node else ""
    return (
        f"epoch {int(row['epoch']) + 1}: step {row['step']}, train loss {float(row['train_loss']):.4f}{val}, "
        f"teacher {float(row.get('teacher_gflops') or 0):.4g} GFLOPs, {float(row.get('epoch_s') or 0):.1f}s"
        f"{where}"
    )


def progress_text(info: dict[str, Any]) -> str:
    return (
        f"loss {float(info['loss']):.3f} | {float(info['img_per_s']):.0f} img/s | teacher "
        f"{float(info['gflops']):.4g} GF used, {float(info['saved']):.4g} GF saved"
    )
