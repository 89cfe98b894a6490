"""MaskedKD training on a real local Ray (2 CPU workers, DDP) against a real teacher: a worker process of a bf16 student
killed mid-run is recovered from the Ray checkpoint, the re-sent requests replay under the same ids, and the teacher's
ledger holds exactly the rows of an uninterrupted run, each what the FLOP model predicts for the kept counts.

One Ray run covers it all: Ray's worker start-up dominates (~20 s per worker group on 2 cores).
"""

from __future__ import annotations

import csv
import logging
import os
import signal
import threading
from pathlib import Path

import pytest
import ray
from process_testkit import digests_by_id, request_log, step_rows, wait_for
from student_testkit import STUDENT, ledger_rows, make_subset, teacher_server, tiny_config, tiny_teacher, unjoined

from maskedkd.checkpoints import load_model
from maskedkd.masked_teacher import MaskedTeacher
from student_client.training.ray_runner import TrainingError, run_with_ray

# Ray / subprocess end-to-end: `make test` starts slow modules first
pytestmark = [pytest.mark.dtype("float32"), pytest.mark.slow]


@pytest.fixture(scope="module")
def local_ray():  # type: ignore[no-untyped-def]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield
    ray.shutdown()


@pytest.mark.dtype("bfloat16")  # a bf16 student (precision="bf16": emulated where the CPU has no bf16)
def test_two_workers_keep_half_survive_a_killed_worker_and_bill_exactly_an_uninterrupted_run(
    local_ray: None, tmp_path: Path
) -> None:
    data = make_subset(tmp_path / "data", train_per_class=4, test_per_class=1)  # 40 train / 10 test images
    teacher = tiny_teacher()
    with teacher_server(tmp_path, teacher, **unjoined(4)) as srv:  # 2 workers x 2 micro-batches of 4 a step
        key = srv.create_key("ray-student")
        out = tmp_path / "run"
        # with the progress bar a user sees (tiny_config turns it off unless asked)
        run = {"workers": 2, "batch_size": 16, "epochs": 2, "micro_batches": 2, "max_failures": 1, "progress": True}
        log = str(out / "requests.jsonl")
        cfg = tiny_config(data, out, srv, key, keep=0.5, strategy="sips", request_log=log, precision="bf16", **run)
        killed: list[int] = []

        def kill_rank0_in_epoch_2() -> None:  # after epoch 1's checkpoint was reported, while steps are in flight
            wait_for(lambda: step_rows(out) >= 4, 300, "step 4", poll_s=0.02)
            pid = next(e["pid"] for e in reversed(request_log(out)) if "-w0-" in str(e["request_id"]))
            os.kill(int(pid), signal.SIGKILL)  # type: ignore[call-overload]
            killed.append(int(pid))  # type: ignore[call-overload]

        killer = threading.Thread(target=kill_rank0_in_epoch_2, daemon=True)
        killer.start()
        summary = run_with_ray(cfg)
        killer.join(timeout=10)
        rows = ledger_rows(srv, "ray-student")

    assert killed, "no worker was killed"
    # 20 images per worker, 8 per worker batch: 3 steps per epoch
    assert summary["epochs_done"] == 2 and summary["global_step"] == 6 and summary["images_seen"] == 80
    with (out / "metrics_steps.csv").open() as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == [1, 2, 3, 4, 5, 6]  # resumed from step 3's checkpoint; the rows after it were rewritten
    assert len(list((out / "ray").rglob("checkpoint_*"))) >= 1

    # exactly the requests of an uninterrupted run, each billed once: what was re-sent after the restart replayed
    log = request_log(out)
    assert len({e["pid"] for e in log}) > 2  # the restarted worker group sent too
    run_id = (out / "run_id").read_text().strip()
    expected = {f"{run_id}-e{s // 3}-w{w}-s{s}-m{m}" for s in range(6) for w in range(2) for m in range(2)}
    assert sorted(r["request_id"] for r in rows) == sorted(expected)
    assert all(len(d) == 1 for d in digests_by_id(log, run_id).values())  # re-sent with the same bytes
    per_image = MaskedTeacher(teacher).gflops(32)  # keep 0.5 of the 8x8 grid
    for r in rows:
        assert r["gflops"] == pytest.approx(r["images"] * per_image, rel=1e-9)
    assert sum(r["images"] for r in rows) == 80
    assert summary["teacher_gflops"] == pytest.approx(sum(r["gflops"] for r in rows), rel=1e-9)
    assert summary["teacher_gflops"] == pytest.approx(80 * per_image, rel=1e-9)
    assert summary["teacher_saving"] == pytest.approx(1 - per_image / MaskedTeacher(teacher).gflops(64), rel=1e-6)
    assert 0.0 <= summary["overlap"] <= 1.0
    assert summary["precision"] == "bf16" and summary["teacher_rebilled_requests"] == 0

    # the teacher server can load the trained student with no extra flags
    _student, meta = load_model(checkpoint=out / "model.safetensors")
    assert meta.model_name == STUDENT and meta.model_kwargs["num_classes"] == 10
    assert meta.extra["epochs_done"] == 2


def ray_failure(data: Path, out: Path, **fields: object) -> str:
    """The TrainingError of a plain run (no teacher) on two Ray workers that fails, as the one line it prints."""
    cfg = tiny_config(data, out, mode="none", workers=2, batch_size=4, **fields)
    with pytest.raises(TrainingError) as err:
        run_with_ray(cfg)
    return str(err.value)


def test_a_worker_crash_without_retries_left_is_one_line(local_ray: None, tmp_path: Path) -> None:
    data = make_subset(tmp_path / "data", train_per_class=1, test_per_class=1)
    error = ray_failure(data, tmp_path / "run", max_failures=0, fail_at_step=0)
    assert error == "RuntimeError: injected failure at step 0"


def test_data_missing_on_a_worker_node_is_one_line_naming_the_node(local_ray: None, tmp_path: Path) -> None:
    missing = tmp_path / "not-on-this-node"  # the driver's preflight is skipped: only the workers look
    error = ray_failure(missing, tmp_path / "run", max_failures=1)
    node_id = ray.get_runtime_context().get_node_id()
    assert error.startswith(f"--data {missing} is not a directory on "), error
    assert f"(Ray node {node_id[:12]}) (rank 0)" in error
    assert "\n" not in error


def test_keep_auto_on_two_workers_decides_once_for_both_and_bills_every_probe(
    local_ray: None, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Each worker probes its own images; the all-reduced numbers give both the same keep, so every step's requests
    from both ranks cost what the FLOP model says for that one keep; the driver prints each decision once."""
    data = make_subset(tmp_path / "data", train_per_class=2, test_per_class=1)  # 20 train images: 10 per worker
    teacher = tiny_teacher()
    with teacher_server(tmp_path, teacher) as srv:
        key = srv.create_key("ray-auto")
        probes = {"keep": "auto", "keep_every": 2, "keep_probes": 2}
        cfg = tiny_config(data, tmp_path / "run", srv, key, workers=2, batch_size=8, max_steps=3, eval=False, **probes)
        summary = run_with_ray(cfg)
        rows = ledger_rows(srv, "ray-auto")
    assert summary["fatal_error"] == "" and summary["global_step"] == 3
    decisions = summary["keep_decisions"]
    assert [d["step"] for d in decisions] == [0, 2]
    printed = [line for line in capfd.readouterr().err.splitlines() if line.startswith("keep auto @ step")]
    assert [line.split(":")[0] for line in printed] == ["keep auto @ step 0", "keep auto @ step 2"]
    assert f"{decisions[1]['strategy']} {decisions[1]['keep']:g}" in printed[1]
    probes = [r for r in rows if "-probe-" in str(r["request_id"])]
    assert len(probes) == 2 * 2 * (1 + 2 * 4)  # 2 decisions x 2 ranks x (full + sips and random x 4 keeps)
    assert {str(r["request_id"]).split("-probe-")[0].rsplit("-", 2)[1] for r in probes} == {"w0", "w1"}
    assert summary["probe_gflops"] == pytest.approx(sum(r["gflops"] for r in probes), rel=1e-9)
    assert summary["teacher_gflops"] == pytest.approx(sum(r["gflops"] for r in rows), rel=1e-9)
    ref = MaskedTeacher(teacher)
    in_force = {0: decisions[0]["keep"], 1: decisions[0]["keep"], 2: decisions[1]["keep"]}
    steps = [r for r in rows if "-probe-" not in str(r["request_id"])]
    assert {str(r["request_id"]).rsplit("-", 3)[1] for r in steps} == {"w0", "w1"}
    for r in steps:
        step = int(str(r["request_id"]).rsplit("-", 2)[1].removeprefix("s"))
        assert r["gflops"] == pytest.approx(r["images"] * ref.gflops(max(1, int(in_force[step] * 64))), rel=1e-9)
