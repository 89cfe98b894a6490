"""Ctrl-C during `student-client train`, as a terminal sends it (SIGINT to the whole process group), in-process and
on Ray: one line with the command that resumes, exit 130; that command finishes the run, every step once in the CSV."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import signal
import subprocess
from pathlib import Path

import pytest
from process_testkit import STUDENT_CLI, clean_env, step_rows, wait_for
from student_testkit import STUDENT, STUDENT_KWARGS, make_subset

# Ray / subprocess end-to-end: `make test` starts slow modules first
pytestmark = [pytest.mark.dtype("float32"), pytest.mark.slow]

ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
STEPS_PER_EPOCH, EPOCHS = 5, 3  # 40 training images, batch 8


def _default_sigint() -> None:
    """A shell's background job inherits SIGINT ignored; a terminal's foreground job (played here) does not."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_until_interrupted(cmd: list[str], cwd: Path, out: Path, steps: int) -> subprocess.CompletedProcess[str]:
    """Start `cmd` in its own session, send SIGINT to its process group once `steps` step rows are written."""
    log = cwd / "interrupted.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=clean_env(),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            text=True,
            start_new_session=True,
            preexec_fn=_default_sigint,
        )
        try:
            wait_for(lambda: step_rows(out) >= steps or proc.poll() is not None, 240, f"{steps} training steps")
            assert proc.poll() is None, log.read_text()[-3000:]
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, "", log.read_text())


@pytest.mark.parametrize("runner", [["--local"], ["--workers", "1"]], ids=["in-process", "ray"])
def test_ctrl_c_prints_the_resume_command_exits_130_and_it_finishes_with_every_step_once(
    tmp_path: Path, runner: list[str]
) -> None:
    make_subset(tmp_path / "data", train_per_class=4, test_per_class=1)
    args = [
        "train",
        "--mode",
        "none",
        "--data",
        "data",
        "--out",
        "run",
        "--student",
        STUDENT,  # relative paths
        "--student-kwargs",
        json.dumps(STUDENT_KWARGS),
        "--epochs",
        str(EPOCHS),
        "--batch-size",
        "8",
        *runner,
    ]
    out = tmp_path / "run"
    interrupted = run_until_interrupted([*STUDENT_CLI, *args], tmp_path, out, STEPS_PER_EPOCH + 3)

    assert interrupted.returncode == 130, interrupted.stderr[-3000:]
    last = interrupted.stderr.strip().splitlines()[-1]
    assert last == "student-client: interrupted; resume with: " + shlex.join(["student-client", *args, "--resume"])
    assert "Traceback" not in interrupted.stderr
    epoch_1 = [
        ln for ln in interrupted.stderr.splitlines() if ln.startswith(f"epoch 1: step {STEPS_PER_EPOCH}, train loss")
    ]
    assert len(epoch_1) == 1 and "val top-1" in epoch_1[0], interrupted.stderr[-3000:]
    if runner != ["--local"]:
        assert re.search(r"^ray: started a local Ray in [\d.]+s; starting 1 worker$", interrupted.stderr, re.M)
        assert re.search(r"^ray: 1 worker on 1 node training after [\d.]+s$", interrupted.stderr, re.M)
    written = step_rows(out)
    assert written > STEPS_PER_EPOCH  # rows past the last checkpoint: the resume redoes those steps

    command = shlex.split(last.split("resume with: ", 1)[1])
    resumed = subprocess.run(
        [*STUDENT_CLI, *command[1:]], cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    assert f"done: {EPOCHS} epochs, {EPOCHS * STEPS_PER_EPOCH} steps" in resumed.stdout

    with (out / "metrics_steps.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    assert all(ISO_UTC.fullmatch(r["time"]) for r in rows), rows[0]["time"]
    assert [r["time"] for r in rows] == sorted(r["time"] for r in rows)
    with (out / "metrics_epochs.csv").open(newline="") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == list(range(EPOCHS))
