"""glibc's allocator tuned for processes that move large request buffers (the teacher server, and the student's
training loop, whose client copies each request's pixels into fresh bytes), and memory given back when idle.

With glibc's defaults, every buffer over the (dynamic) mmap threshold is mapped and unmapped again, and the heap top is
trimmed as soon as 128 KiB are free, so each request's ~MB-sized tensors cost page faults on every use: measured with
the negligible DeiT-S-geometry teacher (`python -m benchmarks.serving.overhead`), the forward's own CPU per image fell
from 454 to 317 us when buffers up to 256 MiB came from the heap and the heap stopped being trimmed between batches. On
the client, a 64-image request's pixels cost ~150 us of CPU per image to encode with glibc's defaults and ~35
with these settings, before the encoding itself was cut to one copy (docs/performance-notes.md, section 23). The price
is memory held after a burst; the server's `give_back` returns it (`malloc_trim`) once it has been idle for
`--idle-trim-s`. Setting any MALLOC_* environment variable keeps glibc's (or the operator's) own settings.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 256 << 20  # buffers below this come from the heap, reused across requests
TRIM_THRESHOLD = 1 << 30  # free heap kept before glibc trims on its own
TOP_PAD = 256 << 20  # extra heap asked of the kernel at once


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None  # glibc only


def tune_allocator() -> bool:
    """Apply the settings above to this process's glibc malloc; False when not glibc or the operator set MALLOC_*."""
    if any(k.startswith("MALLOC_") for k in os.environ):
        return False
    libc = _libc()
    if libc is None:
        return False
    ok = all(
        libc.mallopt(param, value) == 1
        for param, value in (
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (M_TOP_PAD, TOP_PAD),
        )
    )
    if not ok:
        log.warning("could not tune glibc malloc (mallopt refused); serving with its defaults")
    return ok


def give_back() -> bool:
    """Return the heap's free memory to the OS (`malloc_trim(0)`); True when some was returned."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
