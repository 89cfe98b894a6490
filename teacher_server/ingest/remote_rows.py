"""An ingest worker's forward: its staged micro-batch run by the device process (ingest/device_process.py).

The rows were staged into shared memory (engine/rows/shared_host.py), so a call carries only where they lie; the first
call that uses a region hands its descriptor over. Rows outside shared memory (a batch some of whose callers left
before its forward is cut down to a copy: StagedRows.select) are first copied into a spill region.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import send_handle

import torch

from maskedkd.masked_teacher import MaskedTeacher
from maskedkd.v1 import teacher_pb2 as pb
from teacher_server.engine.batching.fair_clock import SharedFairClock
from teacher_server.engine.rows.answers import Answer
from teacher_server.engine.rows.rows_runner import JobShape, Late, split_answers
from teacher_server.engine.rows.shared_host import SharedRegion, region_of, shared_host_tensor
from teacher_server.engine.rows.staging import StagedRows
from teacher_server.engine.teacher.fidelity import DtypeFidelity
from teacher_server.errors import ServiceUnavailableError
from teacher_server.ingest.class_backlog import WorkerBacklog
from teacher_server.ingest.messages import BatchCall, BatchReply, NewRegion, TensorRef


class DeviceForwardError(RuntimeError):
    """The device process could not run a batch (its message says why); nothing of the batch is billed."""


class RemoteRows:
    """`answers(rows, jobs)` through the device process; one call at a time (the batcher has one forward thread)."""

    stage = "handoff"  # the worker's CPU for a batch's round trip; the forward's own counts in the device process
    runs_here = False

    def __init__(self, conn: Connection, device_pid: int, backlog: WorkerBacklog | None = None) -> None:
        self._conn = conn
        self._device_pid = device_pid
        self._backlog = backlog  # told of requests whose call could not be sent: the device never counts them
        self._known: set[int] = set()  # regions the device has mapped
        self._spill: dict[str, torch.Tensor] = {}  # per name: a shared buffer for rows that were not staged there
        self._lock = threading.Lock()

    def answers(self, rows: StagedRows, jobs: Sequence[JobShape]) -> list[Answer | Late]:
        with self._lock:
            try:
                self._send(rows, jobs)
                reply: BatchReply = self._conn.recv()
            except (EOFError, OSError) as exc:
                raise ServiceUnavailableError(
                    "the teacher's device process is gone; nothing was billed: retry on another instance"
                ) from exc
        if reply.error:
            raise DeviceForwardError(reply.error)
        late, too_late = set(reply.late), Late(reply.forward_s)
        run = [job for i, job in enumerate(jobs) if i not in late]
        if not run:
            return [too_late] * len(jobs)
        logits = torch.frombuffer(reply.logits, dtype=torch.float32).view(-1, reply.classes)  # [G run, classes]
        outputs = [None if encoded is None else pb.Outputs.FromString(encoded) for encoded in reply.outputs]
        answered = iter(split_answers(logits, outputs, run))
        return [too_late if i in late else next(answered) for i in range(len(jobs))]

    def _send(self, rows: StagedRows, jobs: Sequence[JobShape]) -> None:
        try:
            call = BatchCall(
                pixels=self._shared(rows.pixels, "pixels"),
                indices=self._shared(rows.indices, "indices"),
                counts=tuple(rows.counts.tolist()),
                uniform=rows.uniform,
                jobs=tuple(jobs),
            )
            self._conn.send(call)
        except BaseException:
            if self._backlog is not None:
                self._backlog.let_go(job.rank for job in jobs)
                self._backlog.abandoned()
            raise

    def _shared(self, tensor: torch.Tensor, name: str) -> TensorRef:
        """Where `tensor` lies in shared memory (copied into the spill buffer `name` first when it does not)."""
        found = region_of(tensor)
        if found is None:
            spill = self._spill.get(f"{name}-{tensor.dtype}")
            if spill is None or spill.numel() < tensor.numel():
                spill = self._spill[f"{name}-{tensor.dtype}"] = shared_host_tensor(tensor.numel(), tensor.dtype)
            view = spill[: tensor.numel()].view(tensor.shape)
            view.copy_(tensor)
            found = region_of(view)
            assert found is not None
        region, offset = found
        if region.id not in self._known:
            self._announce(region)
        return TensorRef(region.id, offset, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))

    def _announce(self, region: SharedRegion) -> None:
        self._conn.send(NewRegion(region.id, region.nbytes))
        send_handle(self._conn, region.fd, self._device_pid)
        self._known.add(region.id)


@dataclass(frozen=True)
class RemoteTeacher:
    """What an ingest worker serves: the device process's teacher, by name, without its weights."""

    name: str
    teacher: MaskedTeacher  # on the meta device: geometry, meter, outputs
    fidelity: DtypeFidelity
    runner: RemoteRows
    index: int  # this worker's number (0..N-1); worker 0 also runs the ledger's housekeeping and the dashboard
    clock: SharedFairClock  # the fair-share clock of all workers: a key's service on one counts on every one
    backlog: WorkerBacklog  # this worker's requests per priority class, read by the device to run better first
