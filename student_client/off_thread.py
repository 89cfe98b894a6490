"""Teacher requests built off the training thread, after the student's work that made their pixels and no later.

Building a request (the kept patches gathered, checked and cast to uint8, copied to the host, encoded) on the
training thread would make training wait on bytes. On CUDA a builder thread on the default stream would still wait
for the GPU: copying the patches to the host synchronizes the stream, and by then the student's next micro-batch is
queued on it, so request i would leave only after the student's forward i + 1. The caller therefore marks its
stream (`mark_after_caller`: a CUDA event after the work queued so far) and the builder does the device work on a
stream of its own that waits for that mark only (`after`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

_local = threading.local()  # per builder thread: {device index: its side stream}


@dataclass(frozen=True)
class DeviceMark:
    event: torch.cuda.Event  # recorded on the caller's stream after the work that made the pixels
    device: torch.device


def mark_after_caller(*tensors: torch.Tensor | None) -> DeviceMark | None:
    """On CUDA (the first CUDA tensor among `tensors`): an event on the caller's current stream; None on a CPU."""
    on_cuda = next((t for t in tensors if t is not None and t.is_cuda), None)
    if on_cuda is None:
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(on_cuda.device))
    return DeviceMark(event, on_cuda.device)


@contextlib.contextmanager
def after(mark: DeviceMark | None) -> Iterator[None]:
    """Run the block's device work on this thread's side stream, once the caller's `mark` is reached. The caller's
    tensors must stay referenced until the block ends (a request's batch does): the block's copy to the host
    synchronizes the side stream before they can be freed."""
    if mark is None:
        yield
        return
    streams: dict[int | None, torch.cuda.Stream] = _local.__dict__.setdefault("streams", {})
    stream = streams.get(mark.device.index)
    if stream is None:
        stream = streams[mark.device.index] = torch.cuda.Stream(mark.device)
    stream.wait_event(mark.event)
    with torch.cuda.stream(stream):
        yield
