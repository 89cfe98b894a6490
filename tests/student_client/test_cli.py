"""`student-client` as a user runs it (subprocesses): one-line errors, a plain run, and eval."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from student_testkit import STUDENT, STUDENT_KWARGS, make_subset, teacher_server, tiny_teacher
from torchvision import datasets, transforms

from maskedkd.checkpoints import load_model
from student_client.cli import main

CLI = [sys.executable, "-m", "student_client.cli"]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=180,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_subset(tmp_path_factory.mktemp("cli") / "data", train_per_class=2, test_per_class=2)


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--student", STUDENT, "--student-kwargs", json.dumps(STUDENT_KWARGS), "--data", str(data),
            "--out", str(out), "--batch-size", "8", "--epochs", "1", "--local", "--no-progress", *extra]


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and lines[0].startswith("student-client: error:")
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_unreachable_teacher_and_bad_key_give_one_line_errors(data: Path, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    proc = run_cli(*train_args(data, tmp_path / "a", "--teacher", dead, "--api-key", "mkd_x"))
    assert_one_line_error(proc, dead, "unavailable")

    with teacher_server(tmp_path, tiny_teacher()) as srv:
        proc = run_cli(*train_args(data, tmp_path / "b", "--teacher", srv.address),
                       env={"MASKEDKD_API_KEY": "mkd_" + "z" * 43})
    assert_one_line_error(proc, "API key")
    assert not (tmp_path / "b" / "checkpoints").exists()


def in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`student-client ARGS` through the same main() the console script calls (saves a Python start-up)."""
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_mode_none_trains_without_a_teacher_and_eval_prints_top1_top5(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MASKEDKD_API_KEY", raising=False)
    code, _, err = in_process(capsys, *train_args(data, tmp_path / "c", "--teacher", "127.0.0.1:1"))
    assert code != 0 and err.count("\n") == 1 and "API key" in err  # kd mode without a key

    out = tmp_path / "plain"
    code, stdout, err = in_process(capsys, *train_args(data, out, "--mode", "none"))
    assert code == 0, err
    assert "student: top-1" in stdout and "teacher:" not in stdout

    code, stdout, err = in_process(capsys, "eval", "--checkpoint", str(out), "--data", str(data))
    assert code == 0, err
    match = re.fullmatch(r"top-1 ([\d.]+)%  top-5 ([\d.]+)%  \((\d+) images\)", stdout.strip())
    assert match, stdout

    # independent count: the saved model on the test split, written out here
    model, _ = load_model(checkpoint=out / "model.safetensors")
    test = datasets.ImageFolder(str(data / "test"), transform=transforms.ToTensor())
    top1 = top5 = 0
    with torch.no_grad():
        for x, y in test:
            logits = model(((x - 0.5) / 0.5)[None])[0]
            ranked = logits.argsort(descending=True).tolist()
            top1 += ranked[0] == y
            top5 += y in ranked[:5]
    assert float(match[1]) == pytest.approx(100 * top1 / len(test), abs=0.01)
    assert float(match[2]) == pytest.approx(100 * top5 / len(test), abs=0.01)
    assert int(match[3]) == len(test) == 20

    code, _, err = in_process(capsys, "eval", "--checkpoint", str(tmp_path / "nope"), "--data", str(data))
    assert code != 0 and err.count("\n") == 1 and "nope" in err
