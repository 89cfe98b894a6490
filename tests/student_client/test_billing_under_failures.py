"""Training never pays twice: a training process killed with SIGKILL and resumed, and a teacher killed and restarted
three times during a run, end with exactly the ledger rows of an uninterrupted run (read back with SQL), every
re-sent request byte-identical to the first send (sha256 from the run's --request-log), and summary.json equal to
what the ledger billed."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
from collections import Counter
from pathlib import Path

import process_testkit as kit
import pytest
from process_testkit import STUDENT_CLI, clean_env, step_rows, train_cmd, wait_for
from student_testkit import ledger_rows, ledger_rows_at, make_subset, teacher_server, tiny_teacher, unjoined

from maskedkd.checkpoints import save_model_checkpoint
from maskedkd.masked_teacher import MaskedTeacher
from student_client.cli import main

# `make test` starts slow modules first
pytestmark = [pytest.mark.dtype("auto"), pytest.mark.timeout(240), pytest.mark.slow]


def run_id_of(out: Path) -> str:
    return (out / "run_id").read_text().strip()


def summary_of(out: Path) -> dict[str, float]:
    return json.loads((out / "summary.json").read_text())


def _kill_at(cmd: list[str], out: Path, steps: int, **env: str) -> None:
    """Run `cmd` and SIGKILL it once `out`'s metrics show `steps` steps done."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=clean_env(**env))
    try:
        wait_for(lambda: step_rows(out) >= steps or proc.poll() is not None, 180, f"{steps} steps")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL, "the run ended before it could be killed"
    finally:
        if proc.poll() is None:
            proc.kill()


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    """Run `cmd` to its end (at most 3 minutes), its output captured."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=clean_env())


def test_kill_9_mid_epoch_then_resume_bills_exactly_the_uninterrupted_run(tmp_path: Path) -> None:
    data = make_subset(tmp_path / "data", train_per_class=4, test_per_class=1)  # 40 images: 5 steps of 8 per epoch
    with teacher_server(tmp_path, tiny_teacher(), **unjoined(4)) as srv:  # 2 micro-batches of 4 a step
        straight, killed = tmp_path / "straight", tmp_path / "killed"
        # the uninterrupted run: the same command line, through the same main() in this process
        assert main(train_cmd(data, straight, srv.address, srv.create_key("straight"))[len(STUDENT_CLI) :]) == 0

        key = srv.create_key("killed")
        _kill_at(train_cmd(data, killed, srv.address, key), killed, 7)  # into epoch 2
        run_id = run_id_of(killed)
        resumed = _run(train_cmd(data, killed, srv.address, key, "--resume"))
        assert resumed.returncode == 0, resumed.stderr
        assert "resuming from" in resumed.stderr
        assert run_id_of(killed) == run_id  # --resume kept the run id
        rows_straight, rows_killed = ledger_rows(srv, "straight"), ledger_rows(srv, "killed")

    def ids(rows: list[dict[str, object]], run: str) -> list[str]:
        return sorted(str(r["request_id"]).removeprefix(run) for r in rows)

    # the same requests, each billed once: 2 epochs x 5 steps x 2 micro-batches
    assert ids(rows_killed, run_id) == ids(rows_straight, run_id_of(straight))
    assert len(rows_killed) == len({r["request_id"] for r in rows_killed}) == 20
    billed = sum(float(r["gflops"]) for r in rows_killed)  # type: ignore[arg-type]
    assert billed == pytest.approx(sum(float(r["gflops"]) for r in rows_straight), rel=1e-12)  # type: ignore[arg-type]
    assert summary_of(killed)["teacher_gflops"] == pytest.approx(billed, rel=1e-9)
    assert summary_of(killed)["teacher_mismatched_requests"] == 0
    with (killed / "metrics_steps.csv").open(newline="") as f:  # the steps redone after the kill: each row once
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, 11))

    # byte identity, proven on the client side: the killed run re-sent epoch 2's first steps under the same ids,
    # with the same bytes as its first attempt and as the uninterrupted run
    log = kit.request_log(killed)
    assert len({e["pid"] for e in log}) == 2
    sent = kit.digests_by_id(log, run_id)
    resent = [rid for rid, n in Counter(str(e["request_id"]) for e in log).items() if n > 1]
    assert len(resent) >= 4, "the kill came too late to re-send anything"
    assert all(len(d) == 1 for d in sent.values()), {k: v for k, v in sent.items() if len(v) > 1}
    assert sent == kit.digests_by_id(kit.request_log(straight), run_id_of(straight))


def test_teacher_killed_and_restarted_three_times_the_run_completes_billed_once(tmp_path: Path) -> None:
    data = make_subset(tmp_path / "data", train_per_class=4, test_per_class=1)
    teacher = tiny_teacher()
    ckpt = save_model_checkpoint(
        tmp_path / "teacher.safetensors",
        teacher,
        model_name="vit_tiny_patch16_224",
        model_kwargs={"img_size": 32, "patch_size": 4, "num_classes": 10, "depth": 2},
    )
    db = tmp_path / "ledger.db"
    server = kit.TeacherProcess(ckpt, db, kit.free_port(), tmp_path / "teacher.log")
    server.start()
    key = kit.create_key(db, "restarts")
    out = tmp_path / "run"
    proc = subprocess.Popen(
        train_cmd(data, out, server.address, key, epochs=2),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    try:
        for rows in (2, 4, 6):  # kill it three times while steps are in flight, and start it again at once
            wait_for(lambda: step_rows(out) >= rows or proc.poll() is not None, 180, f"{rows} steps")
            assert proc.poll() is None, "the run ended before the teacher was killed"
            server.kill()
            server.start()
        _, stderr = proc.communicate(timeout=200)
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()
    assert proc.returncode == 0, stderr
    assert server.starts == 4
    assert stderr.count("waiting up to 120s") >= 1 and "is back after" in stderr

    rows = ledger_rows_at(db, "restarts")
    run_id = run_id_of(out)
    expected = {f"{run_id}-e{s // 5}-w0-s{s}-m{m}" for s in range(10) for m in range(2)}
    assert sorted(r["request_id"] for r in rows) == sorted(expected)  # each id once, none missing, none extra
    per_image = MaskedTeacher(teacher).gflops(32)  # keep 0.5 of the 8x8 grid (SIPS)
    for r in rows:
        assert r["gflops"] == pytest.approx(int(r["images"]) * per_image, rel=1e-9)  # type: ignore[call-overload]
    billed = sum(float(r["gflops"]) for r in rows)  # type: ignore[arg-type]
    assert billed == pytest.approx(80 * per_image, rel=1e-9)  # what an uninterrupted run bills: 2 epochs x 40
    assert summary_of(out)["teacher_gflops"] == pytest.approx(billed, rel=1e-9)
    sent = kit.digests_by_id(kit.request_log(out), run_id)
    assert all(len(d) == 1 for d in sent.values())  # whatever was re-sent went with the same bytes


@pytest.mark.dtype("bfloat16")  # a bf16 student, on any CPU (forced where bf16 is not native)
def test_bf16_run_resumed_with_other_threads_then_other_numerics_bills_the_uninterrupted_run(tmp_path: Path) -> None:
    """Killed at 60% and resumed with 2 threads instead of 1 (bf16 kept: the run's precision is pinned): the same
    bytes. Killed again at 80% and resumed in fp32 with random patches, so every re-sent step sends other patches:
    each re-sent id is answered with what was billed under it (`accept_billed_answer`), never billed again."""
    data = make_subset(tmp_path / "data", train_per_class=4, test_per_class=1)  # 5 steps of 8 per epoch, 2 epochs
    with teacher_server(tmp_path, tiny_teacher(), **unjoined(4)) as srv:  # 2 micro-batches of 4 a step
        straight, killed = tmp_path / "straight", tmp_path / "killed"
        done = _run(train_cmd(data, straight, srv.address, srv.create_key("straight"), "--precision", "bf16"))
        assert done.returncode == 0, done.stderr
        key = srv.create_key("killed")
        _kill_at(train_cmd(data, killed, srv.address, key, "--precision", "bf16"), killed, 6)
        # resumed from epoch 1's checkpoint (step 5) on two threads, killed again at step 8 (80%)
        _kill_at(
            train_cmd(data, killed, srv.address, key, "--resume", "--threads-per-worker", "2"),
            killed,
            8,
            OMP_NUM_THREADS="2",
        )
        numerics = _run(
            train_cmd(data, killed, srv.address, key, "--resume", "--precision", "fp32", "--strategy", "random")
        )
        assert numerics.returncode == 0, numerics.stderr
        rows_straight, rows_killed = ledger_rows(srv, "straight"), ledger_rows(srv, "killed")

    run_id, straight_id = run_id_of(killed), run_id_of(straight)
    assert sorted(str(r["request_id"]).removeprefix(run_id) for r in rows_killed) == sorted(
        str(r["request_id"]).removeprefix(straight_id) for r in rows_straight
    )
    billed = sum(float(r["gflops"]) for r in rows_killed)  # type: ignore[arg-type]
    assert billed == pytest.approx(sum(float(r["gflops"]) for r in rows_straight), rel=1e-12)  # type: ignore[arg-type]
    summary = summary_of(killed)
    assert summary["teacher_gflops"] == pytest.approx(billed, rel=1e-9) and summary["teacher_rebilled_requests"] == 0
    log = kit.request_log(killed)
    by_attempt = [
        kit.digests_by_id([e for e in log if e["pid"] == pid], run_id) for pid in dict.fromkeys(e["pid"] for e in log)
    ]
    assert len(by_attempt) == 3
    # bf16 on two threads re-sent steps 5 and 6 (7 was in flight at the kill) with the bytes of the first attempt
    first, threads, fp32 = by_attempt
    assert [rid for rid in threads if rid in first] and all(
        threads[rid] == first[rid] for rid in threads if rid in first
    )
    # fp32 + random re-sent steps 5..7 with other kept patches: each answered with what was billed, nothing billed
    resent = [rid for rid in fp32 if rid in threads]
    assert len(resent) >= 4 and all(fp32[rid] != threads[rid] for rid in resent)
    assert summary["teacher_mismatched_requests"] == len(resent)
    assert "answered with what was billed" in numerics.stdout


def test_resume_with_another_seed_is_refused_in_one_line(tmp_path: Path) -> None:
    """Another --seed would put other images under the run's request ids (and take the answers billed for the old
    ones): refused before any request."""
    data = make_subset(tmp_path / "data", train_per_class=2, test_per_class=1)
    with teacher_server(tmp_path, tiny_teacher()) as srv:
        key, out = srv.create_key("seed"), tmp_path / "run"
        assert main(train_cmd(data, out, srv.address, key, epochs=1)[len(STUDENT_CLI) :]) == 0
        rows = len(ledger_rows(srv, "seed"))
        again = _run(train_cmd(data, out, srv.address, key, "--resume", "--epochs", "2", "--seed", "7"))
        assert len(ledger_rows(srv, "seed")) == rows  # nothing sent
    assert again.returncode != 0 and "Traceback" not in again.stderr
    errors = [line for line in again.stderr.splitlines() if "--seed 0, not 7" in line]
    assert len(errors) == 1 and "new --out" in errors[0], again.stderr
