"""A worker's call at the device process (device_process.py): its rows read, waiting for the forward thread, which
chooses among the waiting calls by `order` and cuts out the requests found too late as their forward starts."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from teacher_server.engine.batching.forward_step import COMMIT_S_MARGIN
from teacher_server.engine.rows.answers import batch_choice
from teacher_server.engine.rows.rows_runner import DEFAULT_RANK, JobShape
from teacher_server.engine.rows.staging import StagedRows
from teacher_server.ingest.messages import BatchCall, BatchReply


@dataclass(eq=False)
class PendingCall:
    """A worker's call, its rows read (on the forward's device), waiting for the forward thread's reply."""

    call: BatchCall
    rows: StagedRows
    tokens: int  # the teacher tokens of its rows: kept patches plus each row's prefix tokens
    worker: int = 0  # which worker's socket it came on
    seq: int = 0  # arrival order at the device
    reply: BatchReply | None = None
    held_until: float | None = None  # monotonic: held back until then for a better class another worker holds
    done: threading.Event = field(default_factory=threading.Event)
    late: tuple[int, ...] = ()  # its requests found too late as the forward started: their rows were cut out
    forward_s: float = 0.0  # the estimate of that forward they were too late for

    @property
    def rank(self) -> int:
        """Its best priority class (priorities.rank_of): calls of better classes run first."""
        return min((job.rank for job in self.call.jobs), default=DEFAULT_RANK)

    @property
    def tag(self) -> float:
        """The smallest fair-queuing start tag among its requests of its best class (the clock all workers share)."""
        rank = self.rank
        return min((job.tag for job in self.call.jobs if job.rank == rank), default=0.0)

    @property
    def order(self) -> tuple[int, float, int]:
        """Calls run in this order: best class, then smallest start tag (as one fair queue would), then arrival."""
        return self.rank, self.tag, self.seq

    @property
    def logits_only(self) -> bool:
        return not batch_choice([j.outputs for j in self.call.jobs]).any

    @property
    def jobs_run(self) -> list[JobShape]:
        return [job for i, job in enumerate(self.call.jobs) if i not in self.late]

    def cut_late(self, now: float, forward_s: float, prefix: int) -> bool:
        """Cut out the rows of the requests whose callers give up before a forward of `forward_s` starting `now`
        (monotonic) ends and is answered; False: none is left."""
        jobs, finish = self.call.jobs, now + forward_s + COMMIT_S_MARGIN
        self.late = tuple(i for i, job in enumerate(jobs) if job.deadline is not None and job.deadline < finish)
        self.forward_s = forward_s
        if not self.late:
            return True
        if len(self.late) == len(jobs):
            self.reply = BatchReply(bytearray(), 0, (), late=self.late, forward_s=forward_s)
            return False
        self.rows = self.rows.select_requests(
            [job.images for job in jobs], [i not in self.late for i in range(len(jobs))]
        )
        self.tokens = int(self.rows.counts.sum()) + prefix * self.rows.images
        return True
