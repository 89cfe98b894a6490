"""Start a real teacher server in-process for tests: its own event loop in a background thread, 127.0.0.1, a free
port. Any test area may use it:

    with running_server(ServerSettings(model="vit_tiny_patch16_224", model_kwargs={...}, db=f"sqlite:///{p}")) as srv:
        secret = srv.create_key("alice")
        channel = grpc.insecure_channel(srv.address)
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from teacher_server.ledger.keys import create_api_key
from teacher_server.ledger.quota_windows import QuotaWindow
from teacher_server.service.server import TeacherServer
from teacher_server.settings import ServerSettings


class RunningServer:
    """A started TeacherServer and the loop thread it runs on."""

    def __init__(self, settings: ServerSettings, model: nn.Module | None = None) -> None:
        # Tests never take fixed ports: the gRPC port and (unless switched off) the metrics port are picked free.
        overrides: dict[str, Any] = {"host": "127.0.0.1", "port": 0}
        if settings.metrics_port is not None:
            overrides["metrics_port"] = 0
        self.settings = settings.model_copy(update=overrides)
        self.server = TeacherServer(self.settings, model=model)
        self._stopped = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="teacher-server-loop", daemon=True)
        self._thread.start()
        try:
            self._call(self.server.start())
        except BaseException:
            self._shutdown_loop()
            raise

    def _call(self, coro: Any, timeout: float | None = 120.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @property
    def address(self) -> str:
        """ "127.0.0.1:PORT" of the gRPC server."""
        return f"127.0.0.1:{self.server.port}"

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port

    @property
    def metrics_url(self) -> str | None:
        """http://127.0.0.1:PORT/metrics, or None when metrics are off."""
        port = self.server.metrics_port
        return None if port is None else f"http://{self.settings.metrics_host}:{port}/metrics"

    @property
    def dashboard_url(self) -> str | None:
        """http(s)://HOST:PORT of the dashboard when `settings.dashboard_port` was set (0: a free port), else None."""
        port = self.server.dashboard_port
        scheme = "https" if self.settings.tls_cert else "http"
        return None if port is None else f"{scheme}://{self.settings.dashboard_host}:{port}"

    @property
    def model_name(self) -> str:
        return self.server.served.name

    def create_key(
        self,
        name: str,
        quota_gflops: float | None = None,
        price_per_gflop: float | None = None,
        *,
        quota_window: QuotaWindow = "lifetime",
        rate_limit_gflops_per_min: float | None = None,
    ) -> str:
        """Store a new API key in the server's ledger; returns the secret (`mkd_...`)."""
        secret, _ = create_api_key(
            self.server.sessions,
            name=name,
            quota_gflops=quota_gflops,
            price_per_gflop=price_per_gflop,
            quota_window=quota_window,
            rate_limit_gflops_per_min=rate_limit_gflops_per_min,
        )
        return secret

    def invalidate_key_cache(self) -> None:
        """Make key changes done directly in the ledger (disable, quota) take effect now, not after the TTL."""
        self._loop.call_soon_threadsafe(self.server.auth.invalidate)

    def stop(self, grace: float | None = None) -> None:
        """Graceful stop (health NOT_SERVING, in-flight requests finish, ledger flushed); idempotent."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self._call(self.server.stop(grace), timeout=None)
        finally:
            self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        if not self._thread.is_alive():
            self._loop.close()


@contextmanager
def running_server(settings: ServerSettings, *, model: nn.Module | None = None) -> Iterator[RunningServer]:
    """A started server for the `with` block (stopped gracefully at its end). `model`: a timm ViT (or a
    MaskedTeacher) to serve instead of loading `settings.model` / `settings.checkpoint`; it is served under
    `settings.served_name`, else `settings.model`, else its timm architecture name."""
    server = RunningServer(settings, model=model)
    try:
        yield server
    finally:
        server.stop()
