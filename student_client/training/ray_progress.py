"""The driver's view of a Ray run, built from `ray.train.report` metrics only, never from files, so it works when rank 0
runs on another node.

Every worker reports a "start" row, a "step" row every `progress_every` steps, an "epoch" row (with rank 0's
checkpoint) and a "final" summary. Ray Train calls `ForwardReports.after_report` on its controller (an actor on the
driver's node) with all workers' rows; it forwards rank 0's row, plus the node of every rank, to a Ray queue that
`ReportedProgress` drains on the driver: the progress bar, one line per epoch, and the final summary.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Any

from ray.train import UserCallback
from ray.util.queue import Empty, Queue

from student_client.training.metrics import epoch_line, progress_text


class ForwardReports(UserCallback):
    """Runs on Ray Train's controller: rank 0's reported row (+ `nodes`, the node id of each rank) into `queue`."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if metrics:
            self.queue.put(dict(metrics[0], nodes=[m.get("node", "") for m in metrics]))


class ReportedProgress:
    """Driver side: a thread draws the bar and prints epoch lines from the forwarded reports.

    `final` is rank 0's final summary, `nodes` the node id of each rank (from the last report), once seen.
    """

    def __init__(self, *, enabled: bool, started_at: float, poll_s: float = 0.2) -> None:
        """`enabled`: draw the bar (the start and epoch lines are printed either way); `started_at`: the
        time.monotonic() of the launch, for the line that says how long the workers took to start."""
        self.started_at = started_at
        self.queue = Queue(actor_options={"num_cpus": 0})
        self.callback = ForwardReports(self.queue)
        self.enabled = enabled
        self.poll_s = poll_s
        self.final: dict[str, Any] | None = None
        self.nodes: list[str] = []
        self.steps_seen = 0
        self._bar: Any = None
        self._started = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="reported-progress")

    def __enter__(self) -> ReportedProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._drain()  # rows that arrived after the thread's last poll
        if self._bar is not None:
            self._bar.close()
        with contextlib.suppress(Exception):  # the cluster is already gone
            self.queue.shutdown()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                row = self.queue.get(block=True, timeout=self.poll_s)
            except Empty:
                continue
            except Exception:  # noqa: BLE001 - the queue actor died with the cluster: nothing more to show
                return
            self._handle(row)

    def _drain(self) -> None:
        while True:
            try:
                row = self.queue.get_nowait()
            except Exception:  # noqa: BLE001 - Empty, or the queue actor is gone
                return
            self._handle(row)

    def _handle(self, row: dict[str, Any]) -> None:
        self.nodes = list(row.get("nodes") or self.nodes)
        kind = row.get("kind")
        if kind == "final" or row.get("final"):
            self.final = row
        elif kind == "start" and not self._started:
            self._started = True
            workers, nodes = len(self.nodes), len(set(self.nodes))
            where = "" if nodes == 1 else f"; rank 0 on node {self.nodes[0][:12]} writes the metrics CSVs there"
            self._print(
                f"ray: {workers} worker{'s' if workers > 1 else ''} on {nodes} node{'s' if nodes > 1 else ''} "
                f"training after {time.monotonic() - self.started_at:.1f}s{where}"
            )
            self.steps_seen = int(row["initial"])
            if self.enabled:
                from tqdm import tqdm

                self._bar = tqdm(
                    total=int(row["total"]), initial=int(row["initial"]), desc="train", unit="step", dynamic_ncols=True
                )
        elif kind == "step":
            if self._bar is not None and int(row["step"]) > self.steps_seen:
                self._bar.set_postfix_str(
                    progress_text(
                        {
                            "loss": row["loss"],
                            "img_per_s": row["img_per_s"],
                            "gflops": row["total_teacher_gflops"],
                            "saved": row["total_saved_gflops"],
                        }
                    ),
                    refresh=False,
                )
            self._advance(int(row["step"]))
        elif kind == "line":  # a line rank 0 has to say, e.g. a --keep auto decision
            self._print(str(row["text"]))
        elif kind == "epoch":
            self._advance(int(row["global_step"]))  # the steps since the last progress row
            self._print(epoch_line(row, row.get("node") if len(set(self.nodes)) > 1 else None))

    def _advance(self, step: int) -> None:
        if self._bar is not None and step > self.steps_seen:
            self._bar.update(step - self.steps_seen)
        self.steps_seen = max(self.steps_seen, step)

    def _print(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)
