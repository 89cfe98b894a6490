"""The same-host fast path: a caller on the server's machine passes its pixels in a POSIX shared memory region
(`Tensor.shm`) and the gRPC message carries only the region's name and offset.

Off unless the server is started with `--shared-memory`. Then a region is read only for a caller whose connection
comes from this host over loopback TCP (where the server can tell the caller's user), only under names the contract
reserves ("maskedkd-" and 1-64 of [A-Za-z0-9_-], so no other program's region can be named), never following a link,
only a regular file of /dev/shm, only as far as the region holds, only a region owned by the user the caller's
connection runs as (peer_user.py: the kernel's socket diagnostics say who owns the caller's end of a loopback
connection; another user's region is refused even where the server could read it), and only as the server's own user
may (a region made with mode 0600 is readable when caller and server run as one user). The bytes are copied out of
the region once, where the bytes path views them in the message (pixels_in_place.py): from there a shared-memory
request is the same request as one carrying the same bytes in `data` (decoded, checked, digested, billed, replayed
alike), and the caller may change the region as soon as it has its answer. The copy is `os.pread`, not a mapping: a
caller shrinking its region while the server read a mapping of it would fault the server. Measured with `python -m
benchmarks.serving.overhead` (docs/performance-notes.md section 8): ~30 us of server CPU an image less than the same
bytes in the message, the gRPC transport of 75 KB (before the message's pixels were viewed in place; section 19).
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from maskedkd.text import clip
from maskedkd.v1 import teacher_pb2 as pb
from teacher_server.engine.rows.decode import declared_bytes
from teacher_server.errors import InvalidRequestError, PermissionDeniedError
from teacher_server.service.wire.peer_user import peer_uid

REGION_DIR = Path("/dev/shm")  # where Linux keeps POSIX shared memory (shm_open) regions
NAME_RE = re.compile(r"maskedkd-[A-Za-z0-9_-]{1,64}")
# a Unix socket, IPv4 loopback, IPv6 loopback, and IPv4 loopback seen by a dual-stack (::) listener
_LOCAL_PEERS = (
    "unix:",
    "unix-abstract:",
    "ipv4:127.",
    "ipv6:[::1]:",
    "ipv6:%5B::1%5D:",
    "ipv6:[::ffff:127.",
    "ipv6:%5B::ffff:127.",
)


def is_local_peer(peer: str) -> bool:
    """True when a gRPC peer string (`context.peer()`) names a connection from this host: a Unix socket, or a
    loopback address."""
    return peer.startswith(_LOCAL_PEERS)


def shared_input(request: pb.InferRequest) -> pb.SharedMemory | None:
    """The region the request's pixels are in, or None when they travel in the message."""
    which = request.WhichOneof("input")
    if which is None:
        return None
    tensor = getattr(request, which)
    return tensor.shm if tensor.HasField("shm") else None


def read_shared_pixels(
    request: pb.InferRequest, *, enabled: bool, peer: str, listening: tuple[str, int], max_bytes: int
) -> bytes:
    """The pixel bytes of a request whose input names a shared memory region (`shared_input`), as many as its shape
    and dtype declare (at most `max_bytes`, what a message may carry), copied out of the region once;
    PermissionDeniedError or InvalidRequestError (nothing read) when the server may not read them for `peer` (the
    caller's end of the connection, as `context.peer()` names it; `listening`: the server's host and port)."""
    which = request.WhichOneof("input")
    region = shared_input(request)
    assert which is not None and region is not None
    if not enabled:
        raise InvalidRequestError(
            f"{which}.shm: this server does not read shared memory (ModelInfo.shared_memory is false; start it with "
            f"--shared-memory); send the pixels in {which}.data"
        )
    if not is_local_peer(peer):
        raise PermissionDeniedError(
            f"{which}.shm: shared memory is read only for callers on the server's own host; send the pixels in "
            f"{which}.data"
        )
    if getattr(request, which).data:
        raise InvalidRequestError(f"{which}: set either data or shm, not both")
    if not NAME_RE.fullmatch(region.name):
        raise InvalidRequestError(
            f"{which}.shm.name {clip(region.name)} is not a region name this server reads: 'maskedkd-' and then "
            "1-64 characters of [A-Za-z0-9_-]"
        )
    nbytes = declared_bytes(request)  # a bad shape or dtype is then refused by decode_input, as for data
    if nbytes > max_bytes:
        raise InvalidRequestError(
            f"{which}: its shape declares {nbytes} bytes in shared memory, more than a message may carry ({max_bytes})"
        )
    caller = peer_uid(peer, server_host=listening[0], server_port=listening[1])
    if caller is None:
        raise PermissionDeniedError(
            f"{which}.shm: the server cannot tell which user this connection runs as (shared memory is read for "
            f"callers over loopback TCP on Linux); send the pixels in {which}.data"
        )
    return _read(REGION_DIR / region.name, region.offset, max(nbytes, 0), f"{which}.shm", caller)


def _read(path: Path, offset: int, nbytes: int, field: str, caller: int) -> bytes:
    """The bytes, from a regular file owned by the `caller` uid (checked on the open file: no swap after a check)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise InvalidRequestError(f"{field}: no shared memory region {path.name!r} on the server's host") from None
    except PermissionError:
        raise InvalidRequestError(
            f"{field}: the server may not read region {path.name!r} (create it as the server's user, or readable by it)"
        ) from None
    except OSError as exc:  # a link (ELOOP), or anything else the kernel refuses
        raise InvalidRequestError(f"{field}: region {path.name!r} cannot be opened ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidRequestError(f"{field}: {path.name!r} is not a shared memory region")
        if info.st_uid != caller:  # before anything about its size is told
            raise PermissionDeniedError(
                f"{field}: region {path.name!r} belongs to another user than this connection's; a region is read "
                "only for the user that owns it"
            )
        if offset + nbytes > info.st_size:
            raise InvalidRequestError(
                f"{field}: the tensor needs bytes {offset}..{offset + nbytes} of region {path.name!r}, which holds "
                f"{info.st_size}"
            )
        return _pread_all(fd, nbytes, offset)
    finally:
        os.close(fd)


def _pread_all(fd: int, nbytes: int, offset: int) -> bytes:
    """Exactly `nbytes` from `offset`: one copy into a new bytes object (a short read, rare, is completed)."""
    data = os.pread(fd, nbytes, offset)
    while len(data) < nbytes:
        more = os.pread(fd, nbytes - len(data), offset + len(data))
        if not more:
            raise InvalidRequestError("the shared memory region shrank while it was read")
        data += more
    return data
