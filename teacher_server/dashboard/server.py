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


# the settings `teacher-server dashboard` reads, and the flags whose names differ from the fields'
DASHBOARD_FIELDS = ("db", "dashboard_host", "dashboard_port", "admin_token_file", "viewer_token_file",
                    "dashboard_public", "tls_cert", "tls_key")
DASHBOARD_FLAGS = {"dashboard_host": "--host", "dashboard_port": "--port"}


def add_dashboard_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `teacher-server dashboard`, derived from ServerSettings (flags override the MASKEDKD_* env)."""
    from teacher_server.cli.settings_flags import add_setting_flags

    add_setting_flags(parser, DASHBOARD_FIELDS, flags=DASHBOARD_FLAGS, aliases={"dashboard_public": ("--public",)},
                      helps={"dashboard_port": f"port to listen on (unset: {DEFAULT_PORT})"})
    add_secret_refusals(parser)


def add_secret_refusals(parser: argparse.ArgumentParser) -> None:
    """`--admin-token VALUE` / `--viewer-token VALUE` stay known, to be refused with a pointer to the environment
    and file options (a value on the command line shows in `ps`)."""
    parser.add_argument("--admin-token", help=argparse.SUPPRESS)
    parser.add_argument("--viewer-token", help=argparse.SUPPRESS)


def secret_on_command_line(args: argparse.Namespace) -> str | None:
    """The one-line refusal when a token was given as a command-line value, else None."""
    for flag, env in (("admin_token", "MASKEDKD_ADMIN_TOKEN"), ("viewer_token", "MASKEDKD_VIEWER_TOKEN")):
        if getattr(args, flag, None) is not None:
            dashed = "--" + flag.replace("_", "-")
            return (f"{dashed} VALUE is not accepted (command lines show in `ps`): set {env} or pass "
                    f"{dashed}-file FILE")
    return None


def warn_if_public(settings: ServerSettings) -> None:
    """Public read views are meant for a loopback-only address; elsewhere say so on stderr (not refused: behind a
    container's port mapping 0.0.0.0 may still be reachable from the host's loopback only)."""
    if settings.dashboard_public and settings.dashboard_host not in ("127.0.0.1", "::1", "localhost"):
        print(f"teacher-server: warning: dashboard read views are public on {settings.dashboard_host}: whoever "
              "reaches the port reads key names and costs", file=sys.stderr, flush=True)


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """ServerSettings from the environment, overridden by the flags that were given (SettingsError: one line)."""
    from teacher_server.cli.settings_flags import settings_from_flags

    return settings_from_flags(args, DASHBOARD_FIELDS, flags=DASHBOARD_FLAGS)


def run_dashboard_command(args: argparse.Namespace) -> int:
    """`teacher-server dashboard ...`: serve until Ctrl-C. Returns the exit status."""
    import uvicorn

    from teacher_server.cli.settings_flags import SettingsError
    from teacher_server.dashboard.app import create_app

    refusal = secret_on_command_line(args)
    if refusal:
        print(f"teacher-server dashboard: error: {refusal}", file=sys.stderr)
        return 2
    try:
        settings = settings_from_args(args)
    except SettingsError as exc:
        print(f"teacher-server dashboard: error: {exc}", file=sys.stderr)
        return 2
    port = DEFAULT_PORT if settings.dashboard_port is None else settings.dashboard_port
    from teacher_server.service.tls import TlsConfigError, load_tls_files

    try:
        load_tls_files(settings)
    except TlsConfigError as exc:
        print(f"teacher-server dashboard: error: {exc}", file=sys.stderr)
        return 2
    from teacher_server.ledger.database import MissingLedgerError, require_existing_ledger, without_password

    try:
        require_existing_ledger(settings.db)  # the standalone dashboard only reads a ledger
    except MissingLedgerError as exc:
        print(f"teacher-server dashboard: error: {exc}", file=sys.stderr)
        return 2
    warn_if_public(settings)
    try:
        app = create_app(settings)
    except Exception as exc:  # a bad URL or an unreachable database: one line, not a trace
        reason = f"{exc.__class__.__name__}: {exc}".splitlines()[0]
        print(f"teacher-server dashboard: error: cannot open the ledger {without_password(settings.db)}: {reason}",
              file=sys.stderr)
        return 2
    admin = "on" if settings.admin_token else "off (set MASKEDKD_ADMIN_TOKEN or --admin-token-file)"
    views = ("public" if settings.dashboard_public else "viewer or admin token" if settings.viewer_token
             or settings.admin_token else "locked (set MASKEDKD_VIEWER_TOKEN, or --public)")
    scheme = "https" if settings.tls_cert else "http"
    print(f"dashboard: {scheme}://{settings.dashboard_host}:{port}/  (API docs at /docs; admin API {admin}; "
          f"read views {views})", flush=True)
    uvicorn.run(app, host=settings.dashboard_host, port=port, log_level="warning",
                ssl_certfile=settings.tls_cert, ssl_keyfile=settings.tls_key)
    return 0


@dataclass
class RunningDashboard:
    url: str            # "http://host:port" without a trailing slash
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)


def start_dashboard_thread(app: FastAPI, *, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 30.0,
                           tls_cert: str | None = None, tls_key: str | None = None) -> RunningDashboard:
    """Serve `app` with uvicorn in a daemon thread (HTTPS with `tls_cert`/`tls_key`); port 0 picks a free port.
    Returns once it accepts connections."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                           ssl_certfile=tls_cert, ssl_keyfile=tls_key))
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
