"""Staging the next micro-batch while the current one is in the forward: its rows concatenated and, on CUDA, copied
to the device from pinned host memory on a side stream, so the forward thread finds its inputs ready.

Decoding already runs off the forward thread (the servicer decodes each request in a worker thread before it is
queued). The batcher seals a batch while the forward is busy when the batch fills up (token budget or image cap),
which is when serving is at its limit; that batch is staged at once instead of after the running forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

Rows = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # patches [B,K,C,P,P], keep_indices [B,K], keep_counts [B]


@dataclass
class StagedBatch:
    jobs: tuple[Any, ...]  # the jobs whose rows were staged, in order
    rows: Rows  # on the forward's device when it is CUDA, else on the CPU
    ready: torch.cuda.Event | None  # recorded on the side stream after the copies (CUDA only)


class Prefetcher:
    """`start(jobs)` stages in its own thread; `take(future, live)` hands the rows to the forward thread when the
    jobs still alive are exactly the staged ones (else None, and the caller concatenates again)."""

    def __init__(
        self, concat: Callable[[Sequence[Any]], Rows], device: torch.device | None = None, name: str = "teacher"
    ) -> None:
        self._concat = concat
        self._device = device if device is not None and device.type == "cuda" else None
        self._stream = torch.cuda.Stream(self._device) if self._device is not None else None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"prefetch-{name}")

    def start(self, jobs: Sequence[Any]) -> Future[StagedBatch]:
        return self._executor.submit(self._stage, tuple(jobs))

    def _stage(self, jobs: tuple[Any, ...]) -> StagedBatch:
        rows = self._concat(jobs)
        if self._stream is None:
            return StagedBatch(jobs, rows, None)
        with torch.cuda.stream(self._stream):
            moved = tuple(t.pin_memory().to(self._device, non_blocking=True) for t in rows)
            ready = torch.cuda.Event()
            ready.record(self._stream)
        return StagedBatch(jobs, moved, ready)  # type: ignore[arg-type]  # the rows moved to the device keep their tuple shape

    def take(self, staged: Future[StagedBatch] | None, live: Sequence[Any]) -> Rows | None:
        if staged is None:
            return None
        try:
            batch = staged.result()
        except Exception:  # noqa: BLE001 - staging failed: the forward thread concatenates itself and reports any real error
            return None
        if len(batch.jobs) != len(live) or any(a is not b for a, b in zip(batch.jobs, live, strict=True)):
            return None  # a caller went away before the forward: its rows must not run (nor be billed)
        if batch.ready is not None:
            stream = torch.cuda.current_stream(self._device)
            stream.wait_event(batch.ready)
            for t in batch.rows:
                t.record_stream(stream)  # the allocator must not reuse these while the forward reads them
        return batch.rows

    def close(self) -> None:
        self._executor.shutdown(wait=True)
