"""Requests built off the training thread (student_client/transport/off_thread.py): on a CPU nothing to wait for; on
CUDA the builder's device work runs on its own stream once the caller's work that made the pixels is done."""

from __future__ import annotations

import threading

import pytest
import torch
from student_testkit import TINY_INFO

from student_client.transport.off_thread import after, mark_after_caller, to_device, to_host
from student_client.transport.wire import build_request


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


@pytest.mark.dtype("none")
def test_cpu_tensors_are_already_on_the_host() -> None:
    x = torch.arange(12, dtype=torch.uint8).view(3, 4)
    assert to_host(x) is x


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.dtype("none", device="cuda")
def test_cuda_requests_leave_through_one_reused_pinned_buffer() -> None:
    """uint8 kept patches on CUDA, requests of growing and shrinking size built one after another on one thread: each
    request's bytes equal the same request built from host tensors, and the copies reuse one pinned buffer."""
    g = torch.Generator().manual_seed(0)
    pointers = set()
    for batch in (4, 64, 2, 64):
        patches = torch.randint(0, 256, (batch, 8, 3, 4, 4), dtype=torch.uint8, generator=g)  # [B,K,C,P,P]
        keep = torch.stack([torch.randperm(64, generator=g)[:8] for _ in range(batch)])  # [B,K]
        on_host = build_request(TINY_INFO, patches=patches, keep_indices=keep, request_id="r")
        on_cuda = build_request(TINY_INFO, patches=patches.cuda(), keep_indices=keep.cuda(), request_id="r")
        assert on_cuda.serialize() == on_host.serialize()
        copied = to_host(patches.cuda())
        assert copied.is_pinned() and torch.equal(copied, patches)
        pointers.add(copied.untyped_storage().data_ptr())
    assert len(pointers) == 1


@pytest.mark.dtype("float32")
def test_answers_for_a_cpu_student_stay_as_they_are() -> None:
    logits = torch.randn(4, 10)  # [B, classes] float32, CPU
    assert to_device(logits, torch.device("cpu")) is logits


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.dtype("float32", device="cuda")
def test_cuda_answers_reach_the_card_without_a_host_sync() -> None:
    """A host tensor copied as `.to(device)` makes the host wait for the stream (torch flags it in its sync debug
    mode); `to_device` stages it in pinned memory and copies it without that wait, and the values arrive."""
    logits = torch.randn(64, 1000)  # [B, classes] float32, pageable host memory
    a = torch.randn(4096, 4096, device="cuda")
    busy = (a @ a).tanh()  # work queued on the stream when the answer arrives
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError):
            logits.to("cuda")  # the check itself: a copy from pageable memory waits
        on_card = to_device(logits, torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert on_card.is_cuda and torch.equal(on_card.cpu(), logits) and bool(torch.isfinite(busy).all())
