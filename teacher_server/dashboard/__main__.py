"""`python -m teacher_server.dashboard ...`: the same as `teacher-server dashboard ...`."""
from __future__ import annotations

import argparse
import sys

from teacher_server.dashboard.server import add_dashboard_arguments, run_dashboard_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m teacher_server.dashboard",
                                     description="Serve the usage and billing dashboard of a teacher ledger.")
    add_dashboard_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_dashboard_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
