"""`teacher-server`: serve | keys create | keys list | keys disable | keys enable | keys quota | keys share |
keys price | usage | ledger upgrade | ledger purge | dashboard | health, one module a command.

Flags override `MASKEDKD_*` environment variables. Errors are one line on stderr and exit code 2; `keys` and
`usage` only touch the ledger (no torch import), so they are quick.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from maskedkd.settings_cli import FlagError
from maskedkd.text import first_line
from teacher_server.cli.common import CliError, Parser
from teacher_server.cli.dashboard import add_dashboard_arguments, run_dashboard_command
from teacher_server.cli.health import add_health_command, run_health
from teacher_server.cli.keys import add_keys_command, run_keys
from teacher_server.cli.ledger import add_ledger_command, run_ledger
from teacher_server.cli.serve import add_serve_command, run_serve
from teacher_server.cli.usage import add_usage_command, run_usage

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="teacher-server",
        description="MaskedKD teacher service: serve a masked ViT teacher, manage API keys, read usage.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    add_serve_command(sub)
    add_keys_command(sub)
    add_usage_command(sub)
    add_ledger_command(sub)
    add_dashboard_arguments(
        sub.add_parser(
            "dashboard", help="serve the usage and billing dashboard of a ledger on its own (no teacher needed)"
        )
    )
    add_health_command(sub)
    return parser


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": run_serve,
    "keys": run_keys,
    "usage": run_usage,
    "ledger": run_ledger,
    "dashboard": run_dashboard_command,
    "health": run_health,
}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
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
