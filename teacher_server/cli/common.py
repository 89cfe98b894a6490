"""What every `teacher-server` command shares: the one-line error, the parser class, the `--db` flag and the ledger's
sessions from the settings."""

from __future__ import annotations

import argparse
from typing import Any

from maskedkd.settings_cli import OneLineParser, settings_from_flags
from maskedkd.text import first_line
from teacher_server.cli.settings_flags import add_server_flags
from teacher_server.settings import ServerSettings

Parser = OneLineParser  # errors: one line (FlagError), not usage + message


class CliError(Exception):
    """A user-facing failure: printed as one line, exit code 2."""


def add_db(p: argparse.ArgumentParser) -> None:
    add_server_flags(p, ["db"])


def server_settings(
    args: argparse.Namespace | None = None, names: tuple[str, ...] = (), **values: Any
) -> ServerSettings:
    """ServerSettings from the environment and the given flags; a bad value is a FlagError naming its flag."""
    return settings_from_flags(ServerSettings, args or argparse.Namespace(), names, **values)


def open_sessions(db: str | None, *, must_exist: bool = False) -> Any:
    """A session factory on the ledger `--db` (or the environment) names; CliError when it cannot be opened."""
    from sqlalchemy.exc import SQLAlchemyError

    from teacher_server.ledger.database import (
        MissingLedgerError,
        open_ledger,
        require_existing_ledger,
        without_password,
    )

    url = server_settings(db=db).db
    try:
        if must_exist:
            require_existing_ledger(url)
        return open_ledger(url)
    except MissingLedgerError as exc:
        raise CliError(str(exc)) from exc
    except (SQLAlchemyError, OSError) as exc:
        raise CliError(f"cannot open ledger {without_password(url)}: {first_line(exc)}") from exc
