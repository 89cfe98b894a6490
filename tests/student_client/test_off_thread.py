"""Requests built off the training thread (student_client/off_thread.py): on a CPU nothing to wait for; on CUDA the
builder's device work runs on its own stream once the caller's work that made the pixels is done."""

from __future__ import annotations

import threading

import pytest
import torch

from student_client.off_thread import after, mark_after_caller


@pytest.mark.dtype("float32")
def test_cpu_tensors_need_no_mark() -> None:
    x = torch.arange(6.0).view(2, 3)  # [2, 3] float32, CPU
    assert mark_after_caller(None, x) is None
    with after(None):
        assert torch.equal(x * 2, torch.tensor([[0.0, 2.0, 4.0], [6.0, 8.0, 10.0]]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.dtype("float32", device="cuda")
def test_cuda_builder_sees_the_callers_pixels_once_they_are_made() -> None:
    """The caller queues a long computation of the pixels and marks its stream; a builder thread reads them on its
    own stream after the mark and gets the finished values, while the caller's stream has more work queued."""
    a = torch.randn(4096, 4096, device="cuda")
    pixels = a
    for _ in range(8):  # queued, not finished, when the mark is taken
        pixels = (pixels @ a).tanh()
    mark = mark_after_caller(pixels)
    assert mark is not None and mark.device.type == "cuda"
    later = a
    for _ in range(8):  # the caller's next micro-batch, queued behind the mark
        later = (later @ a).tanh()
    got: list[torch.Tensor] = []

    def build() -> None:
        with after(mark):
            got.append(pixels.sum(dim=1).cpu())

    builder = threading.Thread(target=build)
    builder.start()
    builder.join(60)
    torch.cuda.synchronize()
    torch.testing.assert_close(got[0], pixels.sum(dim=1).cpu())
