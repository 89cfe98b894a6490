"""The committed reproduction state: restored only under the same sizes and the same teacher file, never over a
result that is already there."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from experiments import committed_runs
from experiments.configs import SMOKE

pytestmark = pytest.mark.dtype("none")  # no model numerics


def _run(method: str, seed: int, top1: float) -> dict:
    return {"method": method, "seed": seed, "top1": top1, "ledger": {"gflops": 1.5}}


@pytest.fixture()
def state(tmp_path: Path) -> tuple[Path, Path]:
    teacher = tmp_path / "teacher.safetensors"
    teacher.write_bytes(b"weights")
    path = tmp_path / "reproduction_smoke_runs.json"
    committed_runs.save(
        path,
        SMOKE,
        checkpoint=teacher,
        teacher={"top1": 50.0},
        fidelity=None,
        runs=[_run("no_kd", 0, 10.0), _run("maskedkd_50", 0, 12.5)],
    )
    return path, teacher


def test_same_sizes_and_teacher_restore_what_is_missing(state: tuple[Path, Path], tmp_path: Path) -> None:
    path, teacher = state
    out = tmp_path / "out"
    kept = out / "runs" / "no_kd-s0" / "result.json"
    kept.parent.mkdir(parents=True)
    kept.write_text(json.dumps(_run("no_kd", 0, 99.0)))  # OUT's own result wins over the committed one
    assert sorted(committed_runs.restore(path, SMOKE, out, checkpoint=teacher)) == ["maskedkd_50-s0", "teacher"]
    assert json.loads(kept.read_text())["top1"] == 99.0
    assert json.loads((out / "runs" / "maskedkd_50-s0" / "result.json").read_text())["top1"] == 12.5
    assert not (out / "fidelity.json").exists()  # none was recorded


def test_other_sizes_or_another_teacher_restore_nothing(
    state: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, teacher = state
    longer = dataclasses.replace(SMOKE, student=dataclasses.replace(SMOKE.student, epochs=2))
    assert committed_runs.restore(path, longer, tmp_path / "a", checkpoint=teacher) == []
    assert "other sizes" in capsys.readouterr().out
    resched = dataclasses.replace(SMOKE, parallel=2, threads=2, seeds=(0, 1))  # scheduling is not a size
    assert committed_runs.restore(path, resched, tmp_path / "b", checkpoint=teacher)
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"other weights")
    assert committed_runs.restore(path, SMOKE, tmp_path / "c", checkpoint=other) == []
    assert committed_runs.restore(path, SMOKE, tmp_path / "d", checkpoint=tmp_path / "missing") == []
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_methods_being_redone_are_not_restored(state: tuple[Path, Path], tmp_path: Path) -> None:
    path, teacher = state
    out = tmp_path / "out"
    assert sorted(committed_runs.restore(path, SMOKE, out, checkpoint=teacher, skip=("maskedkd_50",))) == [
        "no_kd-s0",
        "teacher",
    ]
    assert not (out / "runs" / "maskedkd_50-s0").exists()
