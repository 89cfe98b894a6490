"""The teacher server's lifecycle: load the teacher, wire service + health + reflection + metrics (+ dashboard),
serve, and shut down gracefully (health NOT_SERVING first, in-flight requests finish, ledger flushed)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import Any

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from torch import nn

from maskedkd.host_memory import give_back, tune_allocator
from maskedkd.torch_threads import helper_pool, on_own_thread
from maskedkd.v1 import teacher_pb2 as pb
from maskedkd.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.engine.served_model import ServedModel, build_served_model
from teacher_server.engine.teacher.teacher_loader import load_teacher
from teacher_server.ingest.remote_rows import RemoteTeacher
from teacher_server.launcher import Ready, TlsMode
from teacher_server.ledger import database
from teacher_server.ledger.refusals import FLUSH_INTERVAL_S, RefusalCounter
from teacher_server.metrics import ServerMetrics
from teacher_server.service.accounting.auth import KeyAuthenticator
from teacher_server.service.accounting.biller import Biller
from teacher_server.service.auth_guard import AuthFirstInterceptor, FailedAuthLimiter
from teacher_server.service.error_interceptor import ErrorInterceptor
from teacher_server.service.inference import InferenceService
from teacher_server.service.servicer import TeacherServicer
from teacher_server.service.tls import TlsConfigError, load_tls_files, server_credentials
from teacher_server.settings import ServerSettings

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TeacherService"].full_name  # "maskedkd.v1.TeacherService"
_FIRST_STOP_NEVER_CUTS_S = 1e9  # TeacherServer.stop: one gRPC stop refuses new calls, only the other cuts


class ServerStartError(RuntimeError):
    """The server cannot start as configured (port taken, dashboard missing, ...)."""


class TeacherServer:
    """One server instance. Construct (loads the model, opens the ledger), then `await start()` / `await stop()`
    on one event loop."""

    def __init__(
        self, settings: ServerSettings, *, model: nn.Module | None = None, remote: RemoteTeacher | None = None
    ) -> None:
        """`model`: serve this module instead of loading one; `remote`: an ingest worker's server, whose batches
        run in the device process (ingest/)."""
        self.settings = settings
        self.remote = remote
        self.metrics = ServerMetrics(
            key_labels=settings.metrics_key_labels, process=str(remote.index) if remote is not None else "0"
        )
        self.sessions = database.open_ledger(settings.db, busy_timeout_s=settings.ledger_busy_timeout_s)
        self.auth = KeyAuthenticator(self.sessions, ttl_s=settings.auth_cache_s)
        biller = Biller(
            sessions=self.sessions,
            default_price_per_gflop=settings.price_per_gflop,
            currency=settings.currency,
            replay_ttl_s=settings.replay_ttl,
            metrics=self.metrics,
        )
        # loaded, checked and warmed up on a thread that then exits: the forward thread's OpenMP team stays the
        # process's only one (maskedkd/torch_threads.py)
        self.served = on_own_thread(lambda: self._load(settings, model, biller))
        self.service = InferenceService(
            served=self.served,
            biller=biller,
            metrics=self.metrics,
            max_message_bytes=settings.max_message_bytes,
            shared_memory=settings.shared_memory,
        )
        self.health = HealthServicer()
        self.refusals = RefusalCounter()  # refused calls per day, key and reason; written by _flush_refusals
        self._interceptor = ErrorInterceptor(self.metrics, self.refusals)
        self.auth_guard = AuthFirstInterceptor(
            self.auth,
            FailedAuthLimiter(
                per_peer_per_s=settings.auth_failures_per_s,
                per_peer_burst=settings.auth_failures_burst,
                global_per_s=settings.auth_failures_global_per_s,
            ),
            self.metrics,
            self.refusals,
            admit=self.service.admit,
        )
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.dashboard_port: int | None = None
        self._server: aio.Server | None = None
        self._servicer: TeacherServicer | None = None
        self._dashboard: Any = None
        self._purger: asyncio.Task[None] | None = None
        self._refusal_writer: asyncio.Task[None] | None = None
        self._trimmer: asyncio.Task[None] | None = None
        self._stopped = False

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    def _load(self, settings: ServerSettings, model: nn.Module | None, biller: Biller) -> ServedModel:
        """The teacher (loaded here, or the ingest worker's weightless copy) with its meter and micro-batcher."""
        remote = self.remote
        if remote is None:
            name, teacher, fidelity = load_teacher(settings, model)
        else:
            name, teacher, fidelity = remote.name, remote.teacher, remote.fidelity
        self.metrics.dtype_agreement.labels(model=name, dtype=fidelity.dtype).set(fidelity.agreement)
        self.metrics.dtype_kl.labels(model=name, dtype=fidelity.dtype).set(fidelity.kl)
        return build_served_model(
            name,
            teacher,
            settings,
            fidelity=fidelity,
            runner=remote.runner if remote is not None else None,
            clock=remote.clock if remote is not None else None,
            backlog=remote.backlog if remote is not None else None,
            finalize=self.metrics.timed("commit", biller.finalize),
            metrics=self.metrics,
        )

    async def start(self) -> None:
        s = self.settings
        try:
            tls = load_tls_files(s)
        except TlsConfigError as exc:
            raise ServerStartError(str(exc)) from exc
        if tune_allocator():
            log.debug("glibc malloc tuned for large request buffers (maskedkd/host_memory.py)")
        # decoding, digests and ledger calls (asyncio.to_thread) never start an OpenMP team beside the forward's
        asyncio.get_running_loop().set_default_executor(helper_pool(min(32, (os.cpu_count() or 1) + 4), "server-io"))
        await self.served.batcher.start()
        limit = s.max_message_bytes
        options: list[tuple[str, int]] = [
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
            ("grpc.so_reuseport", int(self.remote is not None)),  # ingest workers share the supervisor's port
        ]
        if s.max_connection_age_s is not None:  # GOAWAY after the age; calls in flight get the shutdown grace
            options += [
                ("grpc.max_connection_age_ms", int(s.max_connection_age_s * 1000)),
                ("grpc.max_connection_age_grace_ms", int(s.grace_s * 1000)),
            ]
        server = aio.server(
            interceptors=[self.auth_guard, self._interceptor],  # the key is checked before a message is read
            options=options,
        )
        self._servicer = TeacherServicer(
            service=self.service, auth=self.auth, settings=s, metrics=self.metrics, refusals=self.refusals
        )
        pb_grpc.add_TeacherServiceServicer_to_server(self._servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
        )
        reason = "address in use?"
        try:
            if tls is None:
                self.port = server.add_insecure_port(f"{s.host}:{s.port}")
            else:
                self.port = server.add_secure_port(f"{s.host}:{s.port}", server_credentials(tls))
        except RuntimeError as exc:  # grpc raises on a failed bind (older versions returned 0)
            self.port, reason = 0, str(exc).split(";")[0]
        if not self.port:
            await self.served.batcher.close()
            raise ServerStartError(f"cannot listen on {s.host}:{s.port}: {reason}")
        self.service.listening = (s.host, self.port)
        await server.start()
        self._server = server
        if self.remote is None or self.remote.index == 0:  # one purger per ledger writer group is enough
            self._purger = asyncio.create_task(self._purge_periodically(), name="ledger-purge")
        self._refusal_writer = asyncio.create_task(self._write_refusals_periodically(), name="refusal-counts")
        if s.idle_trim_s > 0:
            self._trimmer = asyncio.create_task(self._trim_when_idle(s.idle_trim_s), name="idle-trim")
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if s.metrics_port is not None:
            try:
                self.metrics_port = self.metrics.start_http(host=s.metrics_host, port=s.metrics_port)
            except OSError as exc:
                await self.stop(grace=0)
                raise ServerStartError(f"cannot serve metrics on {s.metrics_host}:{s.metrics_port}: {exc}") from exc
        if s.dashboard_port is not None:
            try:
                self._start_dashboard()
            except Exception:
                await self.stop(grace=0)
                raise

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def stop(self, grace: float | None = None) -> None:
        """Graceful: NOT_SERVING, drain period, refuse new calls, let in-flight ones finish (up to `grace`
        seconds), run what is queued, close the ledger."""
        if self._stopped:
            return
        self._stopped = True
        for task in (self._purger, self._trimmer):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        grace = self.settings.grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        if self.settings.drain_s > 0 and self._server is not None:
            await asyncio.sleep(self.settings.drain_s)
        if self._server is not None:
            # Refuse new calls, give TeacherService calls up to `grace` to finish, then cut what is left (health
            # watchers, reflection streams) instead of letting them hold the shutdown for the whole grace period.
            if self._servicer is not None:  # streams answer what they started, then end UNAVAILABLE
                self._servicer.close_streams()
            # Only the second stop may cut calls, and it does so at once (None, not a grace of 0): grpcio crashes
            # when one stop's grace expires just as the other stop frees the server (Python >= 3.12).
            stopping = asyncio.create_task(self._server.stop(_FIRST_STOP_NEVER_CUTS_S))
            await self._interceptor.wait_idle(grace)
            await self._server.stop(None)
            await stopping
        await self.served.batcher.close()
        self._stop_dashboard()
        self.metrics.stop_http()
        if self._refusal_writer is not None:
            self._refusal_writer.cancel()
            await asyncio.gather(self._refusal_writer, return_exceptions=True)
        try:
            await asyncio.to_thread(self.refusals.flush, self.sessions)
        except Exception:
            log.warning(
                "could not write %d refusal counts at shutdown", sum(self.refusals.pending().values()), exc_info=True
            )
        await asyncio.to_thread(self._flush_ledger)

    async def _purge_periodically(self) -> None:
        """Delete expired replay payloads and give back quota holds of dead requests, every purge interval."""
        from teacher_server.ledger.billing import purge

        def purge_once() -> None:
            with self.sessions() as session:
                purged = purge(session)
            if purged.payloads or purged.holds:
                log.info(
                    "ledger: purged %d expired replay payloads, released %d stale quota holds",
                    purged.payloads,
                    purged.holds,
                )

        while True:
            try:
                await asyncio.to_thread(purge_once)
            except Exception:  # a busy or unreachable ledger: try again next round
                log.warning(
                    "ledger purge failed; retrying in %.0f s", self.settings.replay_purge_interval_s, exc_info=True
                )
            await asyncio.sleep(self.settings.replay_purge_interval_s)

    async def _trim_when_idle(self, idle_s: float) -> None:
        """Give freed heap back to the OS once the teacher has been idle for `idle_s` after serving something."""
        batcher = self.served.batcher
        trimmed_at = batcher.batches_started
        seen = (batcher.batches_started, batcher.idle)
        while True:
            await asyncio.sleep(idle_s)
            now = (batcher.batches_started, batcher.idle)
            if now == seen and batcher.idle and batcher.batches_started != trimmed_at:  # idle for a whole period
                await asyncio.to_thread(give_back)
                trimmed_at = batcher.batches_started
            seen = now

    async def _write_refusals_periodically(self) -> None:
        """Add the refused calls counted in memory to the ledger's counters, once per interval (off the hot path)."""
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            try:
                await asyncio.to_thread(self.refusals.flush, self.sessions)
            except Exception:  # a busy or unreachable ledger: the counts stay pending for the next round
                log.warning("could not write refusal counts; retrying", exc_info=True)

    def _flush_ledger(self) -> None:
        engine = self.sessions.kw["bind"]
        if engine.dialect.name == "sqlite":
            with engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        engine.dispose()

    # ------------------------------------------------------------------------------------------------ dashboard

    def _start_dashboard(self) -> None:
        try:  # lazy: another area, optional at runtime
            from teacher_server.dashboard import create_app
            from teacher_server.dashboard.server import start_dashboard_thread, warn_if_public
        except ImportError as exc:
            raise ServerStartError(f"--dashboard-port given, but the dashboard is not available: {exc}") from exc
        warn_if_public(self.settings)
        try:
            self._dashboard = start_dashboard_thread(
                create_app(self.settings),
                host=self.settings.dashboard_host,
                port=self.settings.dashboard_port or 0,
                tls_cert=self.settings.tls_cert,
                tls_key=self.settings.tls_key,
            )
        except Exception as exc:
            raise ServerStartError(
                f"cannot start the dashboard on {self.settings.dashboard_host}:{self.settings.dashboard_port}: {exc}"
            ) from exc
        self.dashboard_port = int(self._dashboard.url.rsplit(":", 1)[1])

    def _stop_dashboard(self) -> None:
        if self._dashboard is not None:
            self._dashboard.stop()
            self._dashboard = None


async def serve_until_signalled(server: TeacherServer) -> None:
    """Start, announce it (a line for people on stderr, then one JSON line for programs on stdout: launcher.Ready),
    stop gracefully on SIGTERM/SIGINT."""
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ready = announcement(server)
    print(human_announcement(ready), file=sys.stderr, flush=True)
    with contextlib.suppress(OSError):  # stdout closed by whoever started us: nobody reads the line; serve anyway
        print(ready.to_line(), flush=True)
    await stop.wait()
    print("teacher-server: shutting down (finishing in-flight requests)", file=sys.stderr, flush=True)
    await server.stop()
    print("teacher-server: stopped", file=sys.stderr, flush=True)


def announcement(server: TeacherServer) -> Ready:
    """What a started server serves, and where."""
    assert server.port is not None
    return ready_line(server.settings, server.served.name, server.port, server.metrics_port, server.dashboard_port)


def ready_line(s: ServerSettings, model: str, port: int, metrics_port: int | None, dashboard_port: int | None) -> Ready:
    """The announcement of a server of `model` listening on `port` (also the supervisor's, ingest/supervisor.py)."""
    metrics = f"http://{s.metrics_host}:{metrics_port}/metrics" if metrics_port is not None else None
    dashboard = None
    if dashboard_port is not None:
        dashboard = f"{'https' if s.tls_cert else 'http'}://{s.dashboard_host}:{dashboard_port}/"
    tls: TlsMode = "off" if not s.tls_cert else "mtls" if s.tls_client_ca else "tls"
    return Ready(
        address=f"{s.host}:{port}",
        models=(model,),
        metrics_url=metrics,
        dashboard_url=dashboard,
        tls=tls,
        pid=os.getpid(),
    )


def human_announcement(ready: Ready) -> str:
    """teacher-server: serving MODEL on HOST:PORT; metrics URL; dashboard URL; TLS."""
    parts = [f"teacher-server: serving {', '.join(ready.models)} on {ready.address}"]
    if ready.metrics_url is not None:
        parts.append(f"metrics {ready.metrics_url}")
    if ready.dashboard_url is not None:
        parts.append(f"dashboard {ready.dashboard_url}")
    if ready.tls != "off":
        parts.append("mutual TLS (client certificates required)" if ready.tls == "mtls" else "TLS")
    return "; ".join(parts)
