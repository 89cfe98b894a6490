"""`python -m teacher_server.dashboard ...`: the same as `teacher-server dashboard ...` (same flags, same one-line
errors with exit status 2). A thin entry: the command line is teacher_server/cli/dashboard.py, imported only when
this runs, so the dashboard package itself never imports the CLI."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from teacher_server.cli.main import main as cli_main

    return cli_main(["dashboard", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
