"""The client's side of the same-host fast path: a request's pixels written into a POSIX shared memory region the
teacher server on this machine reads (`Tensor.shm`; the server's side: teacher_server/service/wire/shared_memory.py),
so the gRPC message carries a name and an offset instead of ~75 KB an image.

One region per call in flight, reused from call to call (grown when a larger request comes), created by this
process with mode 0600 (readable by a server running as the same user) under a random "maskedkd-" name, and
unlinked when the client closes. A request's region is held until its answer has come back, retries included: the
server reads the region while it decodes the request, and a region is written again only for another call.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing import shared_memory

from maskedkd.v1 import teacher_pb2 as pb
from student_client.transport.outgoing import OutgoingRequest, copy_field

PAGE = 1 << 16  # regions grow in these steps


class SharedPixels:
    """`placed(request)` yields the request as it is sent: its pixels in a region of this client's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[shared_memory.SharedMemory] = []
        self._all: dict[str, shared_memory.SharedMemory] = {}
        self._closed = False

    @contextmanager
    def placed(self, request: OutgoingRequest | pb.InferRequest) -> Iterator[OutgoingRequest]:
        """`place` for the block."""
        sent, release = self.place(request)
        try:
            yield sent
        finally:
            release()

    def place(self, request: OutgoingRequest | pb.InferRequest) -> tuple[OutgoingRequest, Callable[[], None]]:
        """(a copy of `request` whose input's bytes are in a region of this client's, `data` empty; the function that
        gives the region back once the answer is in). A request already placed, or without input, is returned as is."""
        request = OutgoingRequest.of(request)
        message = request.message
        which = message.WhichOneof("input")
        if which is None or getattr(message, which).HasField("shm"):
            return request, nothing_to_release
        pixels = getattr(message, which)
        data = pixels.data if request.pixels is None else request.pixels  # `.data` copies the bytes out of a message
        region = self._take(len(data))
        try:
            assert region.buf is not None  # open until unlinked
            region.buf[: len(data)] = data
            sent = _without(message, which)  # every other field as it is, the pixels' bytes left behind
            tensor = getattr(sent, which)
            tensor.dtype = pixels.dtype
            tensor.shape.extend(pixels.shape)
            tensor.shm.name, tensor.shm.offset = region.name, 0
        except BaseException:
            self._give(region)
            raise
        once = threading.Lock()

        def release() -> None:
            if once.acquire(blocking=False):
                self._give(region)

        return OutgoingRequest(sent), release

    def _take(self, nbytes: int) -> shared_memory.SharedMemory:
        with self._lock:
            if self._closed:
                raise RuntimeError("the client is closed")
            fits = [r for r in self._free if r.size >= nbytes]
            if fits:
                region = min(fits, key=lambda r: r.size)
                self._free.remove(region)
                return region
            if self._free:  # none large enough: replace the largest free one, so the count stays one per call
                self._drop(max(self._free, key=lambda r: r.size))
            size = max(PAGE, -(-nbytes // PAGE) * PAGE)
            region = shared_memory.SharedMemory(name=f"maskedkd-{secrets.token_hex(12)}", create=True, size=size)
            self._all[region.name] = region
            return region

    def _give(self, region: shared_memory.SharedMemory) -> None:
        with self._lock:
            if self._closed:
                self._unlink(region)
            else:
                self._free.append(region)

    def _drop(self, region: shared_memory.SharedMemory) -> None:
        self._free.remove(region)
        self._unlink(region)

    def _unlink(self, region: shared_memory.SharedMemory) -> None:
        self._all.pop(region.name, None)
        region.close()
        region.unlink()

    @property
    def names(self) -> list[str]:
        """The regions this client holds now."""
        with self._lock:
            return sorted(self._all)

    def close(self) -> None:
        """Unlink every free region; a region still in use is unlinked when its call ends."""
        with self._lock:
            self._closed = True
            for region in list(self._free):
                self._drop(region)


def nothing_to_release() -> None:
    """The release of a request that holds no region."""


def _without(request: pb.InferRequest, field: str) -> pb.InferRequest:
    """A copy of `request` without `field` (CopyFrom would copy the pixels' bytes once more only to drop them)."""
    out = pb.InferRequest()
    for descriptor, value in request.ListFields():
        if descriptor.name != field:
            copy_field(out, descriptor, value)
    return out
