"""Running the dashboard: in the foreground (`teacher-server dashboard`) or in a background thread (tests, demo)."""
from __future__ import annotations

import argparse
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # heavy imports stay out of `teacher-server --help`
    import uvicorn
    from fastapi import FastAPI

    from teacher_server.settings import ServerSettings

DEFAULT_PORT = 8080


def add_dashboard_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `teacher-server dashboard` (flags override the MASKEDKD_* environment)."""
    parser.add_argument("--db", help="ledger URL, e.g. sqlite:///maskedkd-ledger.db or postgresql+psycopg2://... "
                                     "(env MASKEDKD_DB)")
    parser.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1; env "
                                                     "MASKEDKD_DASHBOARD_HOST)")
    parser.add_argument("--port", type=int, default=None,
                        help=f"port to listen on (default {DEFAULT_PORT}; env MASKEDKD_DASHBOARD_PORT)")
    parser.add_argument("--admin-token", default=None,
                        help="token for the admin API (prefer env MASKEDKD_ADMIN_TOKEN: flags show in `ps`)")
    parser.add_argument("--price-per-gflop", type=float, default=None, help="default price shown for keys without "
                                                                           "their own (env MASKEDKD_PRICE_PER_GFLOP)")
    parser.add_argument("--currency", default=None, help="currency label (env MASKEDKD_CURRENCY)")


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """ServerSettings from the environment, overridden by the flags that were given."""
    from teacher_server.settings import ServerSettings

    overrides = {"db": args.db, "dashboard_host": args.host, "dashboard_port": args.port,
                 "admin_token": args.admin_token, "price_per_gflop": args.price_per_gflop, "currency": args.currency}
    return ServerSettings(**{k: v for k, v in overrides.items() if v is not None})


def _without_password(url: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return repr(url)


def run_dashboard_command(args: argparse.Namespace) -> int:
    """`teacher-server dashboard ...`: serve until Ctrl-C. Returns the exit status."""
    import uvicorn
    from pydantic import ValidationError

    from teacher_server.dashboard.app import create_app

    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"]))
        print(f"teacher-server dashboard: error: invalid {where}: {first['msg']}", file=sys.stderr)
        return 2
    port = DEFAULT_PORT if settings.dashboard_port is None else settings.dashboard_port
    try:
        app = create_app(settings)
    except Exception as exc:  # a bad URL or an unreachable database: one line, not a trace
        reason = f"{exc.__class__.__name__}: {exc}".splitlines()[0]
        print(f"teacher-server dashboard: error: cannot open the ledger {_without_password(settings.db)}: {reason}",
              file=sys.stderr)
        return 1
    admin = "on" if settings.admin_token else "off (set MASKEDKD_ADMIN_TOKEN or --admin-token)"
    print(f"dashboard: http://{settings.dashboard_host}:{port}/  (API docs at /docs; admin API {admin})", flush=True)
    uvicorn.run(app, host=settings.dashboard_host, port=port, log_level="warning")
    return 0


@dataclass
class RunningDashboard:
    url: str            # "http://host:port" without a trailing slash
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)


def start_dashboard_thread(app: FastAPI, *, host: str = "127.0.0.1", port: int = 0,
                           timeout_s: float = 30.0) -> RunningDashboard:
    """Serve `app` with uvicorn in a daemon thread; port 0 picks a free port. Returns once it accepts connections."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name="maskedkd-dashboard", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the dashboard did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    return RunningDashboard(url=f"http://{host}:{bound}", server=server, thread=thread)
