"""`teacher-server ledger upgrade | purge`: the ledger's schema migrated to the newest revision (ledger/migrate.py),
expired replay payloads and stale quota holds deleted (billing rows are kept)."""

from __future__ import annotations

import argparse
from typing import Any

from maskedkd.text import first_line
from teacher_server.cli.common import CliError, Parser, add_db, open_sessions, server_settings


def add_ledger_command(sub: Any) -> None:
    ledger_cmd = sub.add_parser("ledger", help="ledger maintenance: schema upgrade, replay payload purge")
    ledger_sub = ledger_cmd.add_subparsers(
        dest="ledger_command", required=True, metavar="{upgrade,purge}", parser_class=Parser
    )
    add_db(ledger_sub.add_parser("upgrade", help="migrate the ledger's schema to the newest revision"))
    purge = ledger_sub.add_parser("purge", help="delete expired replay payloads (billing rows are kept)")
    purge.add_argument(
        "--older-than",
        help="also delete the payloads of requests billed longer ago than this (seconds or 30m, 12h, 7d)",
    )
    add_db(purge)


def run_ledger(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from sqlalchemy.exc import SQLAlchemyError

    from teacher_server.ledger.billing import purge
    from teacher_server.ledger.database import make_engine, without_password
    from teacher_server.ledger.migrate import head_revision, upgrade_to_head
    from teacher_server.settings import parse_duration

    url = server_settings(db=args.db).db
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
        sessions = open_sessions(args.db, must_exist=True)
        with sessions() as session:
            purged = purge(session, older_than=older)
        print(f"purged {purged.payloads} replay payloads; released {purged.holds} stale quota holds")
        return 0
    except SQLAlchemyError as exc:
        raise CliError(f"ledger {without_password(url)}: {first_line(exc)}") from exc
