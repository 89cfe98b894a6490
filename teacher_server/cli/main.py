"""`teacher-server`: serve | keys create | keys list | keys disable | keys enable | keys quota | keys price | usage |
ledger upgrade | ledger purge | dashboard | health.

Flags override `MASKEDKD_*` environment variables. Errors are one line on stderr and exit code 2; `keys` and
`usage` only touch the ledger (no torch import), so they are quick.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from maskedkd.settings_cli import FlagError, OneLineParser, settings_from_flags
from maskedkd.text import first_line
from teacher_server.cli.dashboard import add_dashboard_arguments
from teacher_server.cli.settings_flags import (
    SECRET_FIELDS,
    add_secret_refusals,
    add_server_flags,
    secret_on_command_line,
)
from teacher_server.ledger.quota_windows import QUOTA_WINDOWS
from teacher_server.priorities import PRIORITIES
from teacher_server.settings import ServerSettings

EXIT_USAGE = 2
# every setting is a `serve` flag, except the secrets (environment or *_file only)
SERVE_FIELDS = tuple(name for name in ServerSettings.model_fields if name not in SECRET_FIELDS)


class CliError(Exception):
    """A user-facing failure: printed as one line, exit code 2."""


_Parser = OneLineParser  # errors: one line (FlagError), not usage + message


def _add_db(p: argparse.ArgumentParser) -> None:
    add_server_flags(p, ["db"])


def _optional_float(text: str) -> float | None:
    if text.strip().lower() in ("none", "unlimited", ""):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', not {text!r}") from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, not {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, not {text!r}")
    return value


def _price(text: str) -> float | None:
    if text.strip().lower() == "default":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'default', not {text!r}") from None


def _key_command(keys_sub: Any, command: str, text: str, *, name_flag: bool = False) -> argparse.ArgumentParser:
    """The parser of `keys COMMAND NAME ... [--db URL]` (NAME or --name NAME with name_flag)."""
    p = keys_sub.add_parser(command, help=text)
    p.add_argument("name_pos", nargs="?" if name_flag else None, metavar="NAME")
    if name_flag:
        p.add_argument("--name")
    _add_db(p)
    return p


def _add_limit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quota-window",
        choices=QUOTA_WINDOWS,
        default="lifetime",
        help="what the quota counts: all usage, or the current UTC calendar month or day",
    )
    p.add_argument(
        "--rate-limit-gflops-per-min",
        type=_optional_float,
        help="GFLOPs the key may be admitted per minute (default: no rate limit)",
    )


def _add_share_arguments(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument(
        "--weight",
        type=_positive_float,
        required=required,
        default=None if required else 1.0,
        help="the key's share of the teacher against other keys with queued work (default 1: equal shares)",
    )
    p.add_argument(
        "--priority",
        choices=PRIORITIES,
        required=required,
        default=None if required else "standard",
        help="interactive keys are served before standard ones, standard before batch (default standard)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="teacher-server",
        description="MaskedKD teacher service: serve a masked ViT teacher, manage API keys, read usage.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    serve = sub.add_parser("serve", help="serve a teacher over gRPC")
    add_server_flags(serve, SERVE_FIELDS)
    serve.add_argument("--no-metrics", action="store_true", help="do not serve /metrics")
    add_secret_refusals(serve)

    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(
        dest="keys_command",
        required=True,
        metavar="{create,list,disable,enable,quota,share,price}",
        parser_class=_Parser,
    )
    create = keys_sub.add_parser("create", help="create a key and print its secret (shown once)")
    create.add_argument("--name", required=True)
    create.add_argument("--quota-gflops", type=float, help="GFLOPs the key may use in total (default unlimited)")
    create.add_argument("--price-per-gflop", type=float, help="the key's own price (default: the server's)")
    _add_limit_arguments(create)
    _add_share_arguments(create, required=False)
    _add_db(create)
    listing = keys_sub.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    _add_db(listing)
    quota = _key_command(keys_sub, "quota", "set a key's quota (GFLOPs per window) and rate limit (GFLOPs/min)")
    quota.add_argument(
        "--quota-gflops", type=_optional_float, required=True, help="GFLOPs per quota window; 'none': unlimited"
    )
    _add_limit_arguments(quota)
    share = _key_command(keys_sub, "share", "set a key's fair-share weight and priority class")
    _add_share_arguments(share, required=True)
    _key_command(keys_sub, "disable", "disable a key (takes effect within seconds)", name_flag=True)
    _key_command(keys_sub, "enable", "re-enable a disabled key", name_flag=True)
    price = _key_command(keys_sub, "price", "set the price a key's new requests are billed at")
    price.add_argument(
        "--price-per-gflop",
        type=_price,
        required=True,
        metavar="X",
        help="price per GFLOP; 'default': the serving server's --price-per-gflop",
    )

    usage = sub.add_parser(
        "usage",
        help="totals per key: GFLOPs used, full GFLOPs, saving %%, cost and price as "
        "billed, what probe requests cost, refused calls",
    )
    usage.add_argument("--key", help="only this key (by name)")
    output = usage.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="machine-readable output")
    output.add_argument(
        "--csv",
        action="store_true",
        help="usage per UTC day, key, currency and price as CSV (the dashboard's /api/usage/daily.csv)",
    )
    _add_db(usage)

    ledger_cmd = sub.add_parser("ledger", help="ledger maintenance: schema upgrade, replay payload purge")
    ledger_sub = ledger_cmd.add_subparsers(
        dest="ledger_command", required=True, metavar="{upgrade,purge}", parser_class=_Parser
    )
    _add_db(ledger_sub.add_parser("upgrade", help="migrate the ledger's schema to the newest revision"))
    purge = ledger_sub.add_parser("purge", help="delete expired replay payloads (billing rows are kept)")
    purge.add_argument(
        "--older-than",
        help="also delete the payloads of requests billed longer ago than this (seconds or 30m, 12h, 7d)",
    )
    _add_db(purge)

    add_dashboard_arguments(
        sub.add_parser(
            "dashboard", help="serve the usage and billing dashboard of a ledger on its own (no teacher needed)"
        )
    )

    health = sub.add_parser(
        "health",
        help="one gRPC health check of a teacher (container and Kubernetes exec "
        "probes): exit 0 when SERVING, 1 otherwise",
    )
    target = f"{ServerSettings.model_fields['host'].default}:{ServerSettings.model_fields['port'].default}"
    health.add_argument("--target", default=target, help=f"HOST:PORT (default {target})")
    health.add_argument(
        "--service",
        default="",
        help="service to ask about (default: the server as a whole; "
        "maskedkd.v1.TeacherService turns NOT_SERVING while draining)",
    )
    health.add_argument("--ca", help="PEM CA file: check over TLS and verify the server's certificate with it")
    health.add_argument("--client-cert", help="PEM client certificate, for a server with mutual TLS")
    health.add_argument("--client-key", help="PEM private key of --client-cert")
    health.add_argument(
        "--server-name",
        help="name the server's certificate must carry (default: the target's "
        "host), e.g. the Service name clients dial",
    )
    health.add_argument("--timeout", type=float, default=2.0, help="seconds (default 2)")
    return parser


def _settings(args: argparse.Namespace | None = None, names: tuple[str, ...] = (), **values: Any) -> ServerSettings:
    """ServerSettings from the environment and the given flags; a bad value is a FlagError naming its flag."""
    return settings_from_flags(ServerSettings, args or argparse.Namespace(), names, **values)


def _sessions(db: str | None, *, must_exist: bool = False) -> Any:
    from sqlalchemy.exc import SQLAlchemyError

    from teacher_server.ledger.database import (
        MissingLedgerError,
        open_ledger,
        require_existing_ledger,
        without_password,
    )

    url = _settings(db=db).db
    try:
        if must_exist:
            require_existing_ledger(url)
        return open_ledger(url)
    except MissingLedgerError as exc:
        raise CliError(str(exc)) from exc
    except (SQLAlchemyError, OSError) as exc:
        raise CliError(f"cannot open ledger {without_password(url)}: {first_line(exc)}") from exc


def _cmd_serve(args: argparse.Namespace) -> int:
    refusal = secret_on_command_line(args)
    if refusal:
        raise CliError(refusal)
    settings = _settings(args, SERVE_FIELDS)
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
    from teacher_server.engine.teacher_loader import ModelLoadError
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


def _cmd_keys(args: argparse.Namespace) -> int:
    from teacher_server.ledger import models

    sessions = _sessions(args.db)
    try:
        if args.keys_command == "create":
            return _create_key(sessions, args)
        if args.keys_command == "list":
            return _list_keys(sessions, args)
        return _change_key(sessions, args)
    except (ValueError, models.LedgerError) as exc:
        raise CliError(str(exc)) from exc


def _create_key(sessions: Any, args: argparse.Namespace) -> int:
    from teacher_server.ledger.keys import create_api_key_from

    secret, row = create_api_key_from(sessions, args)
    print(secret)
    print(f"created key {row.name!r} ({row.key_prefix}...); the secret above is shown only once", file=sys.stderr)
    return 0


def _list_keys(sessions: Any, args: argparse.Namespace) -> int:
    from teacher_server.cli.usage import fmt_num
    from teacher_server.ledger.keys import list_api_keys

    with sessions() as session:
        listed = list_api_keys(session)
    rows: list[dict[str, Any]] = [
        {
            "name": k.name,
            "prefix": k.key_prefix,
            "created_at": k.created_at.isoformat(),
            "disabled": bool(k.disabled),
            "quota_gflops": k.quota_gflops,
            "price_per_gflop": k.price_per_gflop,
            "quota_window": k.quota_window,
            "rate_limit_gflops_per_min": k.rate_limit_gflops_per_min,
            "weight": k.weight,
            "priority": k.priority,
        }
        for k in listed
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'NAME':24} {'PREFIX':14} {'STATUS':9} {'QUOTA_GFLOPS':>14} {'PRICE/GFLOP':>12}  CREATED")
    for r in rows:
        status = "disabled" if r["disabled"] else "active"
        print(
            f"{r['name']:24} {r['prefix']:14} {status:9} {fmt_num(r['quota_gflops']):>14} "
            f"{fmt_num(r['price_per_gflop']):>12}  {r['created_at']}"
        )
    return 0


def _change_key(sessions: Any, args: argparse.Namespace) -> int:
    """keys disable | enable | quota | share | price: one call of the key service, one line saying what changed."""
    from teacher_server.cli.usage import fmt_num
    from teacher_server.ledger import keys

    name = getattr(args, "name", None) or args.name_pos
    if not name:
        raise CliError(f"keys {args.keys_command} needs a key name (NAME or --name NAME)")
    later = "servers apply it within their auth cache TTL"
    with sessions() as session:
        if args.keys_command in ("disable", "enable"):
            keys.set_api_key_disabled(session, name=name, disabled=args.keys_command == "disable")
            print(f"{args.keys_command}d key {name!r}")
        elif args.keys_command == "quota":
            keys.set_api_key_limits(
                session,
                name=name,
                quota_gflops=args.quota_gflops,
                quota_window=args.quota_window,
                rate_limit_gflops_per_min=args.rate_limit_gflops_per_min,
            )
            print(
                f"key {name!r}: quota {fmt_num(args.quota_gflops)} GFLOPs per {args.quota_window}, rate limit "
                f"{fmt_num(args.rate_limit_gflops_per_min)} GFLOPs/min ({later})"
            )
        elif args.keys_command == "share":
            keys.set_api_key_share(session, name=name, weight=args.weight, priority=args.priority)
            print(f"key {name!r}: weight {args.weight:g}, priority {args.priority} ({later})")
        else:
            keys.set_api_key_price(session, name=name, price_per_gflop=args.price_per_gflop)
            shown = "the server default" if args.price_per_gflop is None else f"{args.price_per_gflop:.6g} per GFLOP"
            print(f"key {name!r}: new requests billed at {shown} (rows billed before keep their price; {later})")
    return 0


def _cmd_ledger(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from sqlalchemy.exc import SQLAlchemyError

    from teacher_server.ledger.billing import purge
    from teacher_server.ledger.database import make_engine, without_password
    from teacher_server.ledger.migrate import head_revision, upgrade_to_head
    from teacher_server.settings import parse_duration

    url = _settings(db=args.db).db
    try:
        if args.ledger_command == "upgrade":
            engine = make_engine(url)
            migrated = upgrade_to_head(engine)
            engine.dispose()
            if migrated is None:
                print(f"ledger {without_password(url)} is at the newest schema ({head_revision()})")
            else:
                print(f"ledger {without_password(url)}: upgraded schema from {migrated[0] or 'empty'} to {migrated[1]}")
            return 0
        try:
            older = None if args.older_than is None else timedelta(seconds=parse_duration(args.older_than))
        except ValueError as exc:
            raise CliError(f"--older-than: {exc}") from exc
        sessions = _sessions(args.db)
        with sessions() as session:
            purged = purge(session, older_than=older)
        print(f"purged {purged.payloads} replay payloads; released {purged.holds} stale quota holds")
        return 0
    except SQLAlchemyError as exc:
        raise CliError(f"ledger {without_password(url)}: {first_line(exc)}") from exc


def _cmd_usage(args: argparse.Namespace) -> int:
    from teacher_server.cli.usage import report_json, report_lines
    from teacher_server.ledger import models, reports, usage_report

    sessions = _sessions(args.db, must_exist=True)
    with sessions() as session:
        try:
            if args.csv:
                reports.check_key_exists(session, key_name=args.key)
                usage_report.write_usage_csv(reports.usage_by_day(session, key_name=args.key), sys.stdout)
                return 0
            report = usage_report.usage_by_key(session, key_name=args.key)
        except models.LedgerError as exc:
            raise CliError(str(exc)) from exc
    if args.json:
        print(json.dumps(report_json(report), indent=2))
    else:
        print("\n".join(report_lines(report)))
    return 0


def _cmd_health(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # gRPC core's handshake logs would break the one-line answer
    from teacher_server.cli.health import HealthTarget, check_health

    result = check_health(
        HealthTarget(
            target=args.target,
            service=args.service,
            ca_file=args.ca,
            client_cert=args.client_cert,
            client_key=args.client_key,
            server_name=args.server_name,
            timeout_s=args.timeout,
        )
    )
    print(result.line, file=sys.stdout if result.serving else sys.stderr)
    return 0 if result.serving else 1


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "serve":
            return _cmd_serve(args)
        if args.command == "keys":
            return _cmd_keys(args)
        if args.command == "ledger":
            return _cmd_ledger(args)
        if args.command == "health":
            return _cmd_health(args)
        if args.command == "dashboard":
            from teacher_server.cli.dashboard import run_dashboard_command

            return run_dashboard_command(args)
        return _cmd_usage(args)
    except (CliError, FlagError) as exc:
        print(f"teacher-server: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - never a traceback for the user; the message is still specific
        print(f"teacher-server: error: {type(exc).__name__}: {first_line(exc)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
