"""Running the dashboard in a background thread (`teacher-server serve --dashboard-port`, tests, demo); the
foreground `teacher-server dashboard` command is teacher_server/cli/dashboard.py."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # heavy imports stay out of `teacher-server --help`
    import uvicorn
    from fastapi import FastAPI

    from teacher_server.settings import ServerSettings


def warn_if_public(settings: ServerSettings) -> None:
    """Public read views are meant for a loopback-only address; elsewhere say so on stderr (not refused: behind a
    container's port mapping 0.0.0.0 may still be reachable from the host's loopback only)."""
    if settings.dashboard_public and settings.dashboard_host not in ("127.0.0.1", "::1", "localhost"):
        print(
            f"teacher-server: warning: dashboard read views are public on {settings.dashboard_host}: whoever "
            "reaches the port reads key names and costs",
            file=sys.stderr,
            flush=True,
        )


@dataclass
class RunningDashboard:
    url: str  # "http://host:port" without a trailing slash
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)


def start_dashboard_thread(
    app: FastAPI,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    timeout_s: float = 30.0,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> RunningDashboard:
    """Serve `app` with uvicorn in a daemon thread (HTTPS with `tls_cert`/`tls_key`); port 0 picks a free port.
    Returns once it accepts connections."""
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(
            app, host=host, port=port, log_level="warning", lifespan="off", ssl_certfile=tls_cert, ssl_keyfile=tls_key
        )
    )
    thread = threading.Thread(target=server.run, name="maskedkd-dashboard", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the dashboard did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    scheme = "https" if tls_cert else "http"
    return RunningDashboard(url=f"{scheme}://{host}:{bound}", server=server, thread=thread)
