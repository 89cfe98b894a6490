"""`python -m experiments.reproduce`: bad flags are one line on stderr (exit 1) before any work; `--parallel` splits
the CPUs between the runs that train at once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from experiments.configs import CIFAR10
from experiments.repro_loop import retire_runs
from experiments.repro_training import thread_counts
from experiments.reproduce import main, recorded_args

pytestmark = pytest.mark.dtype("none")  # no model numerics


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--parallel", "0"], "--parallel must be at least 1, got 0"),
        (["--methods", "no_kd,nope"], "unknown method(s) nope; choose from no_kd,"),
        (["--redo", "keep_auto,nope"], "--redo: nope not among config cifar10's methods"),
        (["--redo", "keep_auto", "--report-only"], "--redo trains again; it does not go with --report-only"),
    ],
)
def test_bad_flags_are_one_line_before_any_work(
    tmp_path: Path, flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*flags, "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"reproduce: error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("cpus", "parallel", "expected"), [(2, 1, (2, 1)), (2, 2, (1, 1)), (16, 2, (8, 7)), (16, 4, (4, 3))]
)
def test_parallel_runs_share_the_cpus(
    monkeypatch: pytest.MonkeyPatch, cpus: int, parallel: int, expected: tuple[int, int]
) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: cpus)
    # (threads of a run without a teacher, student threads beside the one-thread server), per run
    assert thread_counts(dataclasses.replace(CIFAR10, parallel=parallel)) == expected


def test_the_recorded_command_leaves_out_report_only_and_redo() -> None:
    argv = ["--config", "mnist", "--redo", "keep_auto", "--parallel", "2", "--redo=mass_90", "--report-only"]
    assert recorded_args(argv) == ["--config", "mnist", "--parallel", "2"]


def test_redone_runs_are_moved_aside_with_the_probe_of_their_student(tmp_path: Path) -> None:
    for name in ("keep_auto-s0", "keep_auto-s1", "maskedkd_50-s0", "no_kd-s0"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "result.json").write_text("{}")
    (tmp_path / "fidelity.json").write_text("{}")
    assert retire_runs(tmp_path, ("keep_auto",), (0, 1, 2)) == ["keep_auto-s0", "keep_auto-s1"]
    assert (tmp_path / "fidelity.json").exists()  # its student (maskedkd_50 seed 0) stays
    assert retire_runs(tmp_path, ("maskedkd_50",), (0,)) == ["maskedkd_50-s0"]
    assert not (tmp_path / "fidelity.json").exists()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["no_kd-s0", "replaced"]
    replaced = sorted(p.name.split("-2")[0] for p in (tmp_path / "runs" / "replaced").iterdir())
    assert replaced == ["fidelity", "keep_auto-s0", "keep_auto-s1", "maskedkd_50-s0"]


def test_a_method_with_its_own_tau_trains_at_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from experiments import repro_training
    from experiments.configs import METHODS_BY_KEY, MNIST

    sent: list[list[str]] = []
    monkeypatch.setattr(repro_training, "train", lambda cmd, log, api_key=None: sent.append(cmd) or 0.0)

    class Service:  # the address and key a KD run asks for; no server is needed to build the command
        address = "127.0.0.1:1"

        def run_key(self, run_dir: Path) -> str:
            return "mkd_test"

    for key in ("full_kd", "full_kd_tau2"):
        repro_training.train_run(MNIST, MNIST.student, METHODS_BY_KEY[key], 0, tmp_path / key, tmp_path, 1, Service())
    taus = [cmd[cmd.index("--tau") + 1] for cmd in sent]
    assert taus == [str(MNIST.tau), "2.0"] and "full_kd_tau2" in MNIST.methods


def test_redoing_the_probe_student_with_no_run_dir_still_moves_its_probe_aside(tmp_path: Path) -> None:
    (tmp_path / "fidelity.json").write_text("{}")  # e.g. the runs of an OUT whose run dirs were deleted
    assert retire_runs(tmp_path, ("maskedkd_50",), (0,)) == []
    assert [p.name.split("-2")[0] for p in (tmp_path / "runs" / "replaced").iterdir()] == ["fidelity"]
