"""Host buffers another process can map: anonymous shared memory (memfd), found again from any tensor viewing it.

An ingest worker stages its micro-batches into such buffers (staging.py), and the device process maps the same pages
from the descriptor the worker hands it over their socket (ingest/remote_rows.py): the rows cross the process
boundary without a copy. A memfd has no name, so no other process can open it, and nothing is left behind when both
processes exit, however they exit.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import mmap
import os
import threading
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)
_ids = itertools.count(1)
_lock = threading.Lock()


@dataclass(frozen=True)
class SharedRegion:
    id: int  # unique in this process
    fd: int  # the memfd (kept open: handed to the device process when it first needs the region)
    nbytes: int
    address: int  # where it is mapped here
    mapping: mmap.mmap


_regions: list[SharedRegion] = []


def shared_host_tensor(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A 1-D tensor of `numel` elements over a new shared memory region (zeroed)."""
    nbytes = max(1, numel * dtype.itemsize)
    region_id = next(_ids)
    fd = os.memfd_create(f"maskedkd-stage-{region_id}", os.MFD_CLOEXEC)
    os.ftruncate(fd, nbytes)
    mapping = mmap.mmap(fd, nbytes)
    tensor = torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes).view(dtype)[:numel]
    with _lock:
        _regions.append(SharedRegion(region_id, fd, nbytes, tensor.data_ptr(), mapping))
    return tensor


def region_of(tensor: torch.Tensor) -> tuple[SharedRegion, int] | None:
    """(the region, byte offset) holding all of a contiguous CPU `tensor`; None when it lies elsewhere."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        return None
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    with _lock:
        for region in _regions:
            if region.address <= start and end <= region.address + region.nbytes:
                return region, start - region.address
    return None


def view_region(mapping: mmap.mmap, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor of `shape` over a mapped region, from byte `offset` (no copy)."""
    count = math.prod(shape) * dtype.itemsize
    return torch.frombuffer(mapping, dtype=torch.uint8, count=count, offset=offset).view(dtype).view(shape)


def pin_for_cuda(mapping: mmap.mmap) -> bool:
    """Register a mapped region as pinned host memory, so its copies to the GPU run at full speed (as the lone
    server's pinned staging buffers do). False (and pageable copies, still correct) when CUDA refuses."""
    view = torch.frombuffer(mapping, dtype=torch.uint8)
    try:
        error = torch.cuda.cudart().cudaHostRegister(view.data_ptr(), view.numel(), 0)
    except (RuntimeError, AttributeError):
        return False
    if int(getattr(error, "value", error)) != 0:
        log.warning("could not pin a shared staging region (%s); its copies to the GPU will be slower", error)
        return False
    return True


def unpin_for_cuda(mapping: mmap.mmap) -> None:
    with contextlib.suppress(RuntimeError, AttributeError):
        torch.cuda.cudart().cudaHostUnregister(torch.frombuffer(mapping, dtype=torch.uint8).data_ptr())
