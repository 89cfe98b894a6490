"""Teacher requests built off the training thread, after the student's work that made their pixels and no later.

Building a request (the kept patches gathered, checked and cast to uint8, copied to the host, encoded) on the
training thread would make training wait on bytes. On CUDA a builder thread on the default stream would still wait
for the GPU: copying the patches to the host synchronizes the stream, and by then the student's next micro-batch is
queued on it, so request i would leave only after the student's forward i + 1. The caller therefore marks its
stream (`mark_after_caller`: a CUDA event after the work queued so far) and the builder does the device work on a
stream of its own that waits for that mark only (`after`). The kept patches then leave the card in one copy into a
pinned host buffer the builder thread reuses (`to_host`): a copy from pageable memory goes through the driver's own
staging buffer at about half the speed, and pinning a new buffer per batch costs more than the copy.

The answers go the other way without a wait either: `to_device` stages them in pinned memory before the copy.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

_local = threading.local()  # per builder thread: {device index: its side stream}, its pinned buffer


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


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A CUDA tensor copied into this thread's reused pinned buffer (one non-blocking copy on the current stream,
    which is then waited for); a CPU tensor as it is. The result is a view of the buffer, valid until this thread's
    next call: encode it (the request's bytes are a copy) before asking again."""
    if not tensor.is_cuda:
        return tensor
    nbytes = tensor.numel() * tensor.element_size()
    buffer: torch.Tensor | None = getattr(_local, "pinned", None)
    if buffer is None or buffer.numel() < nbytes:
        size = 1 << max(20, (nbytes - 1).bit_length())  # grown in powers of two: steady traffic allocates it once
        buffer = _local.pinned = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    host = buffer[:nbytes].view(tensor.dtype).view(tensor.shape)
    host.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensor.device).synchronize()
    return host


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor (a teacher's answer) on `device` without the host waiting for the work queued there: a copy from
    pageable memory makes the host wait for the stream first, so on CUDA it is staged in pinned memory from torch's
    caching host allocator (which keeps the block until the copy is done) and copied non-blocking. Elsewhere, or for
    a tensor already on a device, `tensor.to(device)`."""
    if device.type != "cuda" or tensor.is_cuda:
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
