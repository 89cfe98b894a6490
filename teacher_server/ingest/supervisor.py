"""`teacher-server serve --ingest-workers N`: one device process running the teacher, N ingest processes on one port.

One Python process receives ~0.3-0.7 GB/s of large gRPC messages (two copies under its interpreter lock) and spends
~100-200 us of CPU per image on the serving path (docs/performance-notes.md); a GPU teacher runs DeiT-S at tens of
thousands of images a second. So with N > 0:

- the device process loads and checks the teacher and runs every micro-batch (ingest/device_process.py);
- N ingest workers listen on the same port (SO_REUSEPORT: the kernel spreads connections over them), each a whole server
  (TLS, keys, checks, digests, dedupe, quota, fair queue, ledger, answers) whose sealed micro-batches are staged in
  shared memory and run by the device process (ingest/remote_rows.py); their fair queues read one clock in shared memory
  (engine/batching/fair_clock.py), so a key's share of the teacher does not grow with the workers its connections reach
  and the queue bounds hold for all of them together;
- this supervisor reserves the port, starts them, serves /metrics summed over all of them (Prometheus multiprocess
  files), announces readiness once all serve, forwards SIGTERM/SIGINT (workers drain and bill what they ran, then the
  device process exits), and stops everything, exiting 1, when any of them dies unexpectedly.

Money is the workers' alone: each bills its own requests in the shared ledger as replicas do (the ledger's unique
constraint settles a request id sent to two workers at once); the device process holds none.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from teacher_server.engine.batching.fair_clock import SharedFairClock
from teacher_server.ingest.class_backlog import ClassBacklog
from teacher_server.ingest.device_process import device_main
from teacher_server.ingest.messages import DeviceFailed, DeviceReady
from teacher_server.ingest.worker import WorkerFailed, WorkerReady, worker_main
from teacher_server.launcher import Ready
from teacher_server.ledger import database
from teacher_server.settings import ServerSettings

log = logging.getLogger(__name__)
# What the device process and the workers import, imported once by multiprocessing's fork server that starts them:
# each child is then a fork of a process that has torch, timm, gRPC and the ledger loaded, not a new interpreter
# importing them again (~5-8 s of CPU a process; the fork server itself starts no thread, so forking it is safe).
CHILD_MODULES = (
    "teacher_server.ingest.device_process",
    "teacher_server.ingest.worker",
    "teacher_server.engine.served_model",
    "teacher_server.engine.teacher.teacher_loader",
    "teacher_server.ingest.remote_rows",
    "teacher_server.service.server",
)
STARTUP_TIMEOUT_S = 600.0  # loading a big teacher from disk and checking its dtype
EXIT_MARGIN_S = 30.0  # beyond drain + grace, how long a stopping worker may take before it is killed


class IngestStartError(RuntimeError):
    """The device process or a worker could not start (message: why, one line)."""


def worker_settings(settings: ServerSettings, index: int, port: int) -> ServerSettings:
    """Worker `index`'s settings: the shared port, no /metrics of its own (the supervisor serves all) and the
    dashboard on worker 0 only. The queue bounds stay whole: the workers count against them together, in the fair
    queues' shared clock."""
    return settings.model_copy(
        update={"port": port, "metrics_port": None, "dashboard_port": settings.dashboard_port if index == 0 else None}
    )


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound, not listening, SO_REUSEPORT socket on host:port (port 0: a free one), held while the workers serve
    there, so the port stays ours between their starts and restarts."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]

    def bind(shared: bool) -> socket.socket:
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(shared))
        try:
            sock.bind(address)
        except OSError as exc:
            sock.close()
            raise IngestStartError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
        return sock

    if port != 0:  # first alone: a port another server shares by SO_REUSEPORT is taken, not joined
        bind(shared=False).close()
    return bind(shared=True)


class Supervisor:
    def __init__(self, settings: ServerSettings) -> None:
        if settings.ingest_workers < 1:
            raise ValueError("the supervisor needs ingest_workers >= 1")
        if database.in_memory_sqlite(settings.db):
            raise IngestStartError(
                "--ingest-workers needs a ledger the processes share: a SQLite file or Postgres, not an in-memory one"
            )
        self.settings = settings
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(list(CHILD_MODULES))
        self._metrics_dir = tempfile.mkdtemp(prefix="maskedkd-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self._metrics_dir  # before any child starts: they inherit it
        self.device: BaseProcess | None = None
        self.workers: list[BaseProcess] = []
        self.port = 0
        self.served_name = ""
        self.dashboard_port: int | None = None
        self.metrics_port: int | None = None
        self._metrics_http: Any = None
        self._reserved: socket.socket | None = None

    # ---- start
    def start(self) -> None:
        s = self.settings
        sessions = database.open_ledger(s.db, busy_timeout_s=s.ledger_busy_timeout_s)  # migrated once, here
        sessions.kw["bind"].dispose()
        self._reserved = reserve_port(s.host, s.port)
        self.port = int(self._reserved.getsockname()[1])
        pairs = [self._ctx.Pipe(duplex=True) for _ in range(s.ingest_workers)]  # (device end, worker end)
        ready_r, ready_w = self._ctx.Pipe(duplex=False)
        clock = SharedFairClock(self._ctx)  # one fair share across the workers
        backlog = ClassBacklog(self._ctx, s.ingest_workers, clock)  # what each worker holds, read by the device
        self.device = self._ctx.Process(
            target=device_main, args=(s, [d for d, _ in pairs], ready_w, backlog), name="teacher-device", daemon=False
        )
        self.device.start()
        ready_w.close()
        for d, _ in pairs:
            d.close()
        info = self._await(ready_r, self.device, "the device process")
        if isinstance(info, DeviceFailed):
            raise IngestStartError(info.reason)
        assert isinstance(info, DeviceReady)
        self.served_name = info.name
        statuses = []
        for i, (_, w) in enumerate(pairs):
            status_r, status_w = self._ctx.Pipe(duplex=False)
            proc = self._ctx.Process(
                target=worker_main,
                args=(worker_settings(s, i, self.port), i, w, self.device.pid, info, status_w, clock, backlog),
                name=f"ingest-worker-{i}",
            )
            proc.start()
            w.close()
            status_w.close()
            self.workers.append(proc)
            statuses.append(status_r)
        for i, (status, worker) in enumerate(zip(statuses, self.workers, strict=True)):
            ready = self._await(status, worker, f"ingest worker {i}")
            if isinstance(ready, WorkerFailed):
                raise IngestStartError(f"ingest worker {i}: {ready.reason}")
            assert isinstance(ready, WorkerReady)
            if i == 0:
                self.dashboard_port = ready.dashboard_port
        if s.metrics_port is not None:
            self._serve_metrics()

    def _await(self, conn: Connection, proc: BaseProcess, who: str) -> object:
        """The first message `proc` sends on `conn`; IngestStartError when it exits first or takes too long."""
        if not wait([conn, proc.sentinel], STARTUP_TIMEOUT_S):
            raise IngestStartError(f"{who} did not start within {STARTUP_TIMEOUT_S:.0f} s")
        if conn.poll():
            return conn.recv()
        raise IngestStartError(f"{who} exited during start-up (exit code {proc.exitcode}); see the log above")

    def _serve_metrics(self) -> None:
        from prometheus_client import CollectorRegistry, multiprocess, start_http_server

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self._metrics_dir)
        s = self.settings
        try:
            self._metrics_http, _ = start_http_server(s.metrics_port or 0, addr=s.metrics_host, registry=registry)
        except OSError as exc:
            raise IngestStartError(f"cannot serve metrics on {s.metrics_host}:{s.metrics_port}: {exc}") from exc
        self.metrics_port = int(self._metrics_http.server_address[1])

    def announcement(self) -> Ready:
        from teacher_server.service.server import ready_line

        return ready_line(self.settings, self.served_name, self.port, self.metrics_port, self.dashboard_port)

    # ---- run and stop
    def run_until_signalled(self) -> int:
        """Serve until SIGTERM/SIGINT (0 once all stopped) or until a child dies on its own (1)."""
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signalled: list[int] = []

        def on_signal(signum: int, _frame: object) -> None:
            signalled.append(signum)
            with contextlib.suppress(OSError):
                os.write(wake_w, b"x")

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        children = {p.sentinel: p for p in (self.device, *self.workers) if p is not None}
        woke = wait([wake_r, *children])
        if signalled:
            print("teacher-server: shutting down (finishing in-flight requests)", file=sys.stderr, flush=True)
            return 0 if self.stop() else 1
        died = next(children[s] for s in woke if s in children)
        died.join(EXIT_MARGIN_S)  # its sentinel closes as it exits, a moment before it can be reaped
        log.error("%s exited unexpectedly (exit code %s); stopping the others", died.name, died.exitcode)
        self.stop()
        return 1

    def stop(self) -> bool:
        """SIGTERM the workers (they drain, bill and answer what they ran), wait, then let the device process end.
        True when everything stopped within its time."""
        s = self.settings
        clean = True
        for proc in self.workers:
            if proc.exitcode is None and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)
        for proc in self.workers:
            proc.join(s.drain_s + s.grace_s + EXIT_MARGIN_S)
            clean &= self._reap(proc)
        if self.device is not None:
            self.device.join(EXIT_MARGIN_S)  # it ends once every worker closed its socket
            clean &= self._reap(self.device)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        if self._reserved is not None:
            self._reserved.close()
        shutil.rmtree(self._metrics_dir, ignore_errors=True)
        return clean

    def _reap(self, proc: BaseProcess) -> bool:
        from prometheus_client import multiprocess

        clean = True
        if proc.exitcode is None:
            log.warning("%s did not stop in time; killing it", proc.name)
            proc.kill()
            proc.join()
            clean = False
        if proc.pid is not None:
            multiprocess.mark_process_dead(proc.pid, self._metrics_dir)
        return clean and proc.exitcode == 0


def serve_with_ingest_workers(settings: ServerSettings) -> int:
    """The `serve` command with --ingest-workers N: start, announce, serve until signalled; the exit code."""
    from teacher_server.service.server import human_announcement

    supervisor = Supervisor(settings)
    try:
        supervisor.start()
    except BaseException:
        supervisor.stop()
        raise
    ready = supervisor.announcement()
    pids = ", ".join(str(p.pid) for p in supervisor.workers)
    device = supervisor.device.pid if supervisor.device is not None else None
    print(f"{human_announcement(ready)}; ingest workers in pids {pids}, the teacher in pid {device}", file=sys.stderr)
    with contextlib.suppress(OSError):
        print(ready.to_line(), flush=True)
    code = supervisor.run_until_signalled()
    print("teacher-server: stopped", file=sys.stderr, flush=True)
    return code
