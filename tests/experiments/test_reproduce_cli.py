"""`python -m experiments.reproduce`: bad flags are one line on stderr (exit 1) before any work; `--parallel` splits
the CPUs between the runs that train at once."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from experiments.configs import CIFAR10
from experiments.reproduce import main, thread_counts


@pytest.mark.parametrize(("flags", "message"), [
    (["--parallel", "0"], "--parallel must be at least 1, got 0"),
    (["--methods", "no_kd,nope"], "unknown method(s) nope; choose from no_kd,"),
])
def test_bad_flags_are_one_line_before_any_work(tmp_path: Path, flags: list[str], message: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*flags, "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"reproduce: error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("cpus", "parallel", "expected"), [(2, 1, (2, 1)), (2, 2, (1, 1)), (16, 2, (8, 7)),
                                                             (16, 4, (4, 3))])
def test_parallel_runs_share_the_cpus(monkeypatch: pytest.MonkeyPatch, cpus: int, parallel: int,
                                      expected: tuple[int, int]) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: cpus)
    # (threads of a run without a teacher, student threads beside the one-thread server), per run
    assert thread_counts(dataclasses.replace(CIFAR10, parallel=parallel)) == expected
