"""What an ingest worker and the device process say to each other over their socket (pickled dataclasses).

Per micro-batch one `BatchCall` (where its staged rows lie in shared memory, what each request asked for and until
when its caller waits) and one `BatchReply` (the logits, each request's extra outputs encoded, which requests were
too late to run, or why the forward failed). A region the device has not mapped yet is announced first by a
`NewRegion`, followed by its file descriptor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from maskedkd.masked_teacher import MaskedTeacher
from teacher_server.engine.rows.rows_runner import JobShape
from teacher_server.engine.teacher.fidelity import DtypeFidelity


@dataclass(frozen=True)
class TensorRef:
    """A contiguous tensor in a shared region of the worker."""

    region: int  # SharedRegion.id
    offset: int  # bytes from the region's start
    dtype: str  # torch dtype name, e.g. "uint8"
    shape: tuple[int, ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype = getattr(torch, self.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"not a torch dtype: {self.dtype!r}")
        return dtype


@dataclass(frozen=True)
class NewRegion:
    id: int
    nbytes: int  # the descriptor follows (multiprocessing.reduction.send_handle)


@dataclass(frozen=True)
class BatchCall:
    pixels: TensorRef  # [G, K, C, P, P] uint8, or float32 on the 0..255 scale
    indices: TensorRef  # [G, K] int64
    counts: tuple[int, ...]  # [G] kept patches per row
    uniform: bool
    jobs: tuple[JobShape, ...]  # the requests, in row order


@dataclass(frozen=True)
class BatchReply:
    logits: bytearray  # [G, classes] float32, native byte order: the rows of the requests run
    classes: int
    outputs: tuple[bytes | None, ...]  # per request run: pb.Outputs encoded, or None
    error: str = ""  # not empty: the forward failed (nothing else is set)
    late: tuple[int, ...] = ()  # the requests not run: their deadline would have passed before the forward ended
    forward_s: float = 0.0  # with `late`: the device's estimate of the forward they were too late for


@dataclass(frozen=True)
class DeviceReady:
    """What the device process tells the supervisor once its teacher is loaded and checked."""

    name: str  # the served model name
    meta_teacher: bytes  # torch.save of the teacher on the meta device, in the served dtype (geometry, meter,
    # outputs; no weights)
    fidelity: DtypeFidelity


@dataclass(frozen=True)
class DeviceFailed:
    reason: str  # one line: why the teacher could not be loaded


def load_meta_teacher(data: bytes) -> MaskedTeacher:
    """The weightless teacher a worker checks requests against (trusted: made by our own device process)."""
    import io

    teacher = torch.load(io.BytesIO(data), weights_only=False)
    if not isinstance(teacher, MaskedTeacher):
        raise TypeError(f"expected a MaskedTeacher, got {type(teacher).__name__}")
    return teacher
