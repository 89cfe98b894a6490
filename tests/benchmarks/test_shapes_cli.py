"""`python -m benchmarks.compute.shapes`: bad arguments are one line on stderr and exit 2, before any model is built."""

from __future__ import annotations

import pytest

from benchmarks.compute.shapes import main

pytestmark = pytest.mark.dtype("none")


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--shapes", "4:x"], "compile_shapes wants B:K pairs of positive integers"),
        (["--shapes", "4:50"], "shapes must keep 98 patches"),
        (["--sizes", "a"], "--sizes wants comma-separated positive integers"),
    ],
)
def test_bad_arguments_are_one_line(argv: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("python -m benchmarks.compute.shapes: error: ") and says in last
