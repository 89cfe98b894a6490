"""An ingest worker of `serve --ingest-workers N`: a whole teacher server on the shared port (TLS, keys, checks,
digests, dedupe, quota, fair queue, ledger, answers) whose micro-batches run in the device process, and whose fair
queue reads the clock all workers share; what it holds per priority class it counts where the device reads it."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from teacher_server.engine.batching.fair_clock import SharedFairClock
from teacher_server.ingest.children import die_with_supervisor
from teacher_server.ingest.class_backlog import ClassBacklog
from teacher_server.ingest.messages import DeviceReady, load_meta_teacher
from teacher_server.settings import ServerSettings

if TYPE_CHECKING:
    from teacher_server.service.server import TeacherServer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerReady:
    port: int
    dashboard_port: int | None


@dataclass(frozen=True)
class WorkerFailed:
    reason: str


def worker_main(
    settings: ServerSettings,
    index: int,
    device: Connection,
    device_pid: int,
    info: DeviceReady,
    status: Connection,
    clock: SharedFairClock,
    backlog: ClassBacklog,
) -> None:
    """Entry of ingest worker `index` (forked by the fork server): serve until SIGTERM (or SIGINT), then drain."""
    die_with_supervisor()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker-{index} %(name)s %(levelname)s %(message)s")
    from sqlalchemy.exc import SQLAlchemyError

    from maskedkd.text import first_line
    from maskedkd.torch_threads import helper_thread
    from teacher_server.ingest.remote_rows import RemoteRows, RemoteTeacher
    from teacher_server.service.server import ServerStartError, TeacherServer

    try:
        held = backlog.writer(index)
        remote = RemoteTeacher(
            info.name,
            load_meta_teacher(info.meta_teacher),
            info.fidelity,
            RemoteRows(device, device_pid, held),
            index,
            clock,
            held,
        )
        server = TeacherServer(settings, remote=remote)
        helper_thread()  # the teacher computes in the device process (maskedkd/torch_threads.py)
        asyncio.run(_serve(server, status))
    except (ServerStartError, SQLAlchemyError, OSError) as exc:
        status.send(WorkerFailed(first_line(exc)))


async def _serve(server: TeacherServer, status: Connection) -> None:
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    assert server.port is not None
    status.send(WorkerReady(server.port, server.dashboard_port))
    await stop.wait()
    await server.stop()
