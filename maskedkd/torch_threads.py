"""One thread of a process runs torch's intra-op parallelism; every helper thread runs its torch ops alone.

On a CPU, torch's parallel ops run on OpenMP (libgomp). Each thread that starts a parallel region gets a team of
worker threads of its own, kept until that thread exits, and once a process holds more such workers than it has
CPUs, libgomp stops spinning between regions for every team ("throttled"): each region then waits for its workers to
wake from a futex. On a 2-core CPU a small forward then runs up to 2x slower and a training step 20-40% slower
(`python -m benchmarks.compute.omp_teams`; docs/performance-notes.md, section 30). The helper threads of the server
(decoding, staging, committing) and of the client (encoding, sending) run small copies for which one thread is
enough, so they never start a team: `helper_thread` is their initializer, and the thread that computes (the server's
forward, the student's training loop) keeps the process's threads.

Only the calling thread's OpenMP setting changes. `torch.set_num_threads` would also change the count that torch
gives every thread it has not set up yet, such as a training thread started later.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar, cast

import torch

T = TypeVar("T")


@functools.cache
def _omp_set_num_threads() -> Callable[[int], None] | None:
    """The OpenMP runtime's `omp_set_num_threads` that torch loaded (None: no OpenMP runtime in this process)."""
    try:
        function = ctypes.CDLL(None).omp_set_num_threads
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = None
    return cast(Callable[[int], None], function)


def helper_thread() -> None:
    """A `ThreadPoolExecutor` initializer (or a thread's first call): its torch ops on this thread alone, every other
    thread's setting left as it is."""
    torch.get_num_threads()  # torch's own per-thread set-up first: it would later overwrite what follows
    set_threads = _omp_set_num_threads()
    if set_threads is not None:
        set_threads(1)


def helper_pool(max_workers: int, name: str) -> ThreadPoolExecutor:
    """A thread pool for work beside the computing thread: its threads never start an OpenMP team."""
    return ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=name, initializer=helper_thread)


def on_own_thread(work: Callable[[], T]) -> T:
    """`work()` on a thread of its own that exits after it, taking its OpenMP team along: start-up compute (loading,
    checking, compiling a teacher) in a process whose computing thread is another one."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="start-up") as pool:
        return pool.submit(work).result()
