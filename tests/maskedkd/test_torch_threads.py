"""Helper threads run torch on one thread each and never change any other thread's count: the process's computing
thread (the server's forward, a student's training loop) keeps its OpenMP team as the only one. Checked on the
threads' own settings, read on each thread (no tensors: no dtype applies; CPU)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from maskedkd.torch_threads import helper_pool, helper_thread, on_own_thread

pytestmark = pytest.mark.dtype("none", device="cpu")


def on_plain_thread() -> int:
    """torch's thread count as a thread this module never touched sees it."""
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0]


def test_a_helper_thread_runs_torch_alone_and_leaves_every_other_threads_count() -> None:
    here, elsewhere = torch.get_num_threads(), on_plain_thread()
    with helper_pool(2, "test-helper") as pool:
        assert pool.submit(torch.get_num_threads).result() == 1
        assert pool.submit(lambda: float(torch.ones(1 << 20).sum())).result() == float(1 << 20)  # still computes
    assert torch.get_num_threads() == here  # the calling thread's count is untouched
    assert on_plain_thread() == elsewhere  # and so is what a new thread gets (torch.set_num_threads would set it)


def test_helper_thread_as_a_threads_first_call() -> None:
    def body() -> int:
        helper_thread()
        return torch.get_num_threads()

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(body).result() == 1


def test_start_up_work_runs_on_a_thread_of_its_own_and_returns_its_result() -> None:
    main = threading.get_ident()
    assert on_own_thread(threading.get_ident) != main
    with pytest.raises(ValueError, match="bad"):
        on_own_thread(lambda: int("bad"))
