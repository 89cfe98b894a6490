"""How the repository's own programs (`python -m experiments.reproduce`, `scripts/demo.py`) end: an expected error is
one line on stderr and exit status 1, Ctrl-C one line and status 130; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


def exit_status(
    prog: str,
    run: Callable[[], int],
    errors: tuple[type[Exception], ...],
    *,
    describe: Callable[[Exception], str] = str,
    interrupted: str = "interrupted",
) -> int:
    """`run()`'s exit status. An error of one of `errors` prints "<prog>: error: <describe(error)>" and gives
    EXIT_ERROR; Ctrl-C prints "<prog>: <interrupted>" and gives EXIT_INTERRUPTED (both on stderr)."""
    try:
        return run()
    except errors as exc:
        print(f"{prog}: error: {describe(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
