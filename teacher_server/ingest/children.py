"""What every child of the supervisor does first: arrange to end with the supervisor, however it ends."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
from multiprocessing import forkserver

PR_SET_PDEATHSIG = 1


def die_with_supervisor(sig: int = signal.SIGTERM) -> None:
    """Have `sig` sent to this process when the supervisor dies, however it dies (SIGKILL included): a worker then
    drains and exits, instead of serving on without a supervisor. Linux only; elsewhere nothing.

    The children are forked by multiprocessing's fork server (supervisor.py), so their parent is the fork server. It
    exits once every holder of its "alive" pipe has closed it: the supervisor, and each child it forked, which inherits
    the pipe to fork children of its own (ours fork none). So ask for `sig` when the parent dies, then let go of the
    pipe: the fork server then ends with the supervisor, and the kernel sends `sig`."""
    _signal_when_parent_dies(sig)
    _release_fork_server()


def _signal_when_parent_dies(sig: int) -> None:
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        ctypes.CDLL(name, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return


def _release_fork_server() -> None:
    # Private to multiprocessing (CPython 3.4 to 3.14 keep the inherited pipe there); a child that started no fork
    # server of its own (its pid None) holds only the inherited copy.
    server = forkserver._forkserver
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is None or getattr(server, "_forkserver_pid", None) is not None:
        return
    with contextlib.suppress(OSError):
        os.close(fd)
    setattr(server, "_forkserver_alive_fd", None)  # noqa: B010 (not in typeshed's ForkServer)
