"""Per-step and per-epoch metrics to CSV (and TensorBoard when installed), and the rank-0 progress bar of in-process
runs (a Ray run's driver draws its bar from the reports: `ray_progress`)."""
from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

STEP_COLUMNS = (
    "step", "epoch", "loss", "ce", "kd", "lr", "images", "img_per_s", "step_s",
    "teacher_gflops", "teacher_full_gflops", "teacher_cost", "total_teacher_gflops", "total_saved_gflops",
    "overlap", "teacher_wait_s", "time",
)
EPOCH_COLUMNS = (
    "epoch", "step", "train_loss", "train_ce", "train_kd", "val_top1", "val_top5", "images", "epoch_s",
    "teacher_gflops", "teacher_full_gflops", "teacher_cost", "teacher_saving", "overlap", "time",
)


class _CsvLog:
    def __init__(self, path: Path, columns: tuple[str, ...], append: bool) -> None:
        fresh = not (append and path.is_file() and path.stat().st_size > 0)
        self._file = path.open("w" if fresh else "a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=columns, extrasaction="ignore")
        if fresh:
            self._writer.writeheader()

    def write(self, row: dict[str, Any]) -> None:
        self._writer.writerow({k: _fmt(v) for k, v in row.items()})
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _fmt(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v


class MetricsWriter:
    """`out/metrics_steps.csv`, `out/metrics_epochs.csv`, and `out/tensorboard/` when tensorboard is installed."""

    def __init__(self, out_dir: str | Path, *, append: bool) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.steps = _CsvLog(out / "metrics_steps.csv", STEP_COLUMNS, append)
        self.epochs = _CsvLog(out / "metrics_epochs.csv", EPOCH_COLUMNS, append)
        self._tb: Any = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out / "tensorboard"))
        except Exception:  # tensorboard not installed: CSV only
            self._tb = None

    def log_step(self, row: dict[str, Any]) -> None:
        row = {"time": time.time(), **row}
        self.steps.write(row)
        if self._tb is not None:
            for k in ("loss", "ce", "kd", "lr", "img_per_s", "total_teacher_gflops", "overlap"):
                if isinstance(row.get(k), (int, float)):
                    self._tb.add_scalar(f"step/{k}", row[k], row["step"])

    def log_epoch(self, row: dict[str, Any]) -> None:
        row = {"time": time.time(), **row}
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
    """The tqdm bar of an in-process run (rank 0): loss, img/s, teacher GFLOPs used and saved; tqdm adds the ETA."""

    def __init__(self, total: int, initial: int, *, enabled: bool) -> None:
        self._bar: Any = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def update(self, n: int, info: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(progress_text(info), refresh=False)
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def progress_text(info: dict[str, Any]) -> str:
    return (f"loss {float(info['loss']):.3f} | {float(info['img_per_s']):.0f} img/s | teacher "
            f"{float(info['gflops']):.4g} GF used, {float(info['saved']):.4g} GF saved")
