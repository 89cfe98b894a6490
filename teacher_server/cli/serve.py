"""`teacher-server serve`: every server setting as a flag (the secrets from the environment or files only), checked
before torch is imported, then the server in this process or behind `--ingest-workers`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from maskedkd.text import first_line
from teacher_server.cli.common import CliError, server_settings
from teacher_server.cli.settings_flags import (
    SECRET_FIELDS,
    add_secret_refusals,
    add_server_flags,
    secret_on_command_line,
)
from teacher_server.settings import ServerSettings

# every setting is a `serve` flag, except the secrets (environment or *_file only)
SERVE_FIELDS = tuple(name for name in ServerSettings.model_fields if name not in SECRET_FIELDS)


def add_serve_command(sub: Any) -> None:
    serve = sub.add_parser("serve", help="serve a teacher over gRPC")
    add_server_flags(serve, SERVE_FIELDS)
    serve.add_argument("--no-metrics", action="store_true", help="do not serve /metrics")
    add_secret_refusals(serve)


def run_serve(args: argparse.Namespace) -> int:
    refusal = secret_on_command_line(args)
    if refusal:
        raise CliError(refusal)
    settings = server_settings(args, SERVE_FIELDS)
    if not settings.model and not settings.checkpoint:  # before importing torch: a quick answer
        raise CliError("no teacher given: pass --model NAME and/or --checkpoint PATH")
    from teacher_server.service.tls import TlsConfigError, load_tls_files

    try:
        load_tls_files(settings)  # a bad path or key: one line now, not after loading the model
    except TlsConfigError as exc:
        raise CliError(str(exc)) from exc
    if args.no_metrics:
        settings.metrics_port = None
    import asyncio
    import logging

    from sqlalchemy.exc import SQLAlchemyError

    from maskedkd.torch_threads import helper_thread
    from teacher_server.engine.teacher.teacher_loader import ModelLoadError
    from teacher_server.service.server import ServerStartError, TeacherServer, serve_until_signalled

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if settings.ingest_workers:
        from teacher_server.ingest.supervisor import IngestStartError, serve_with_ingest_workers

        try:
            return serve_with_ingest_workers(settings)
        except (IngestStartError, SQLAlchemyError) as exc:
            raise CliError(first_line(exc)) from exc
    try:
        server = TeacherServer(settings)
        helper_thread()  # this thread runs the event loop; the forward thread computes (maskedkd/torch_threads.py)
        asyncio.run(serve_until_signalled(server))
    except (ModelLoadError, ServerStartError, SQLAlchemyError) as exc:
        raise CliError(first_line(exc)) from exc
    return 0
