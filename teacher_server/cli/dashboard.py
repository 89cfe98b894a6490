"""`teacher-server dashboard` (and `python -m teacher_server.dashboard`): its flags, derived from ServerSettings, and
serving the dashboard of a ledger in the foreground until Ctrl-C."""

from __future__ import annotations

import argparse
import sys

from maskedkd.settings_cli import FlagError, settings_from_flags
from maskedkd.text import first_line
from teacher_server.cli.settings_flags import add_secret_refusals, add_server_flags, secret_on_command_line
from teacher_server.settings import ServerSettings

DEFAULT_PORT = 8080
# the settings `teacher-server dashboard` reads, and the flags whose names differ from the fields'
DASHBOARD_FIELDS = (
    "db",
    "dashboard_host",
    "dashboard_port",
    "admin_token_file",
    "viewer_token_file",
    "dashboard_public",
    "tls_cert",
    "tls_key",
)
DASHBOARD_FLAGS = {"dashboard_host": "--host", "dashboard_port": "--port"}


def add_dashboard_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `teacher-server dashboard` (flags override the MASKEDKD_* environment)."""
    add_server_flags(
        parser,
        DASHBOARD_FIELDS,
        flags=DASHBOARD_FLAGS,
        aliases={"dashboard_public": ("--public",)},
        helps={"dashboard_port": f"port to listen on (unset: {DEFAULT_PORT})"},
    )
    add_secret_refusals(parser)


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """ServerSettings from the environment, overridden by the flags that were given (FlagError: one line)."""
    return settings_from_flags(ServerSettings, args, DASHBOARD_FIELDS, flags=DASHBOARD_FLAGS)


def _refuse(message: str) -> int:
    print(f"teacher-server dashboard: error: {message}", file=sys.stderr)
    return 2


def run_dashboard_command(args: argparse.Namespace) -> int:
    """`teacher-server dashboard ...`: serve until Ctrl-C. Returns the exit status."""
    import uvicorn

    from teacher_server.dashboard.app import create_app
    from teacher_server.dashboard.server import warn_if_public
    from teacher_server.ledger.database import MissingLedgerError, require_existing_ledger, without_password
    from teacher_server.service.tls import TlsConfigError, load_tls_files

    refusal = secret_on_command_line(args)
    if refusal:
        return _refuse(refusal)
    try:
        settings = settings_from_args(args)
        load_tls_files(settings)
    except (FlagError, TlsConfigError) as exc:
        return _refuse(str(exc))
    port = DEFAULT_PORT if settings.dashboard_port is None else settings.dashboard_port
    try:
        require_existing_ledger(settings.db)  # the standalone dashboard only reads a ledger
    except MissingLedgerError as exc:
        return _refuse(str(exc))
    warn_if_public(settings)
    try:
        app = create_app(settings)
    except Exception as exc:  # noqa: BLE001 - a bad URL or an unreachable database: one line, not a trace
        reason = first_line(f"{exc.__class__.__name__}: {exc}")
        return _refuse(f"cannot open the ledger {without_password(settings.db)}: {reason}")
    admin = "on" if settings.admin_token else "off (set MASKEDKD_ADMIN_TOKEN or --admin-token-file)"
    views = (
        "public"
        if settings.dashboard_public
        else "viewer or admin token"
        if settings.viewer_token or settings.admin_token
        else "locked (set MASKEDKD_VIEWER_TOKEN, or --public)"
    )
    scheme = "https" if settings.tls_cert else "http"
    print(
        f"dashboard: {scheme}://{settings.dashboard_host}:{port}/  (API docs at /docs; admin API {admin}; "
        f"read views {views})",
        flush=True,
    )
    uvicorn.run(
        app,
        host=settings.dashboard_host,
        port=port,
        log_level="warning",
        ssl_certfile=settings.tls_cert,
        ssl_keyfile=settings.tls_key,
    )
    return 0
