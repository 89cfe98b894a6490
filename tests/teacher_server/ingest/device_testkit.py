"""What the ingest tests share: the teacher (a tiny ViT in float32 on the CPU, a fixture), a device loop serving socket
pairs in a thread of this process, a device whose forwards wait for the test, calls queued behind a held forward in a
chosen order, and a request of random patches."""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection

import pytest
import service_testkit as kit
import torch

from maskedkd.masked_teacher import MaskedTeacher
from teacher_server.engine.rows.decode import DecodedInput
from teacher_server.engine.rows.rows_runner import RowsRunner
from teacher_server.ingest.device_process import DeviceLoop
from teacher_server.metrics import ServerMetrics

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def teacher() -> MaskedTeacher:
    return MaskedTeacher(kit.tiny_vit(seed=5))


@contextlib.contextmanager
def serving(device: DeviceLoop, workers: int = 1) -> Iterator[list[Connection]]:
    """`device` serving `workers` socket pairs in a thread of this process; yields the workers' ends, and checks
    that the loop ends once they are closed."""
    pipes = [multiprocessing.Pipe(duplex=True) for _ in range(workers)]
    loop = threading.Thread(target=device.serve, args=([there for _, there in pipes],), daemon=True)
    loop.start()
    yield [here for here, _ in pipes]
    for here, _ in pipes:
        here.close()
    loop.join(10)
    assert not loop.is_alive()  # the loop ends when its workers close their sockets


def queue_behind_a_held_forward(
    device: DeviceLoop, started: threading.Event, sends: list[Callable[[], None]]
) -> list[threading.Thread]:
    """Start `sends[0]` and wait until its forward has started (the test holds it), then each other send in turn,
    once the one before it is queued on the device, so they queue in this order. Returns the senders' threads."""
    senders = [threading.Thread(target=send) for send in sends]
    senders[0].start()
    started.wait(30)
    for i, sender in enumerate(senders[1:], start=1):
        sender.start()
        while device.queued() < i:
            threading.Event().wait(0.005)
    return senders


def request(batch: int, k: int, seed: int, counts: list[int] | None = None) -> DecodedInput:
    images, keep = kit.random_images(batch, seed), kit.random_keep(batch, k, seed)
    patches = kit.patches_of(images, keep)  # [B, K, 3, 4, 4] uint8
    counts_t = torch.tensor(counts if counts is not None else [k] * batch)
    return DecodedInput("patches", patches, keep, counts_t, patches.numpy().tobytes())


def held_device(
    teacher: MaskedTeacher, metrics: ServerMetrics | None = None, **loop: object
) -> tuple[DeviceLoop, threading.Event, threading.Event, list[int]]:
    """A CPU device loop whose forwards wait for `gate` (after setting `started`), recording each forward's rows."""
    gate, started = threading.Event(), threading.Event()
    forwards: list[int] = []

    def gated(pixels: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
        forwards.append(int(pixels.shape[0]))
        started.set()
        gate.wait(30)
        return teacher.forward_pixels(pixels, indices, counts)

    device = DeviceLoop(RowsRunner(gated), CPU, metrics or ServerMetrics(), **loop)  # type: ignore[arg-type]
    return device, gate, started, forwards
