"""MaskedKD training on a real local Ray (2 CPU workers, DDP) against a real teacher: a worker failure mid-run is
recovered from the Ray checkpoint, and the teacher's ledger shows what the FLOP model predicts for the kept counts.

One Ray run covers it all: Ray's worker start-up dominates (~20 s per worker group on 2 cores).
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
import ray
from student_testkit import STUDENT, STUDENT_KWARGS, ledger_rows, make_subset, teacher_server, tiny_teacher

from student_client.config import TrainConfig
from student_client.ray_runner import TrainingError, run_with_ray
from teacher_server.checkpoints import load_model
from teacher_server.masked_teacher import MaskedTeacher


@pytest.fixture(scope="module")
def local_ray():  # type: ignore[no-untyped-def]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield
    ray.shutdown()


def test_two_workers_keep_half_recover_from_a_failure_and_bill_what_the_flop_model_predicts(
    local_ray: None, tmp_path: Path,
) -> None:
    data = make_subset(tmp_path / "data", train_per_class=4, test_per_class=1)  # 40 train / 10 test images
    teacher = tiny_teacher()
    with teacher_server(tmp_path, teacher) as srv:
        key = srv.create_key("ray-student")
        cfg = TrainConfig(
            data=str(data), out=str(tmp_path / "run"), teacher=srv.address, api_key=key, student=STUDENT,
            student_kwargs=STUDENT_KWARGS, workers=2, batch_size=16, epochs=2, keep=0.5, strategy="sips",
            micro_batches=2, max_failures=1,
            fail_at_step=3,  # rank 0 crashes once as epoch 2 starts, after epoch 1's checkpoint was reported
        )
        summary = run_with_ray(cfg)
        rows = ledger_rows(srv, "ray-student")

    # 20 images per worker, 8 per worker batch: 3 steps per epoch
    assert summary["epochs_done"] == 2 and summary["global_step"] == 6 and summary["images_seen"] == 80
    out = Path(cfg.out)
    assert (out / ".failure_injected").read_text() == "3"
    with (out / "metrics_steps.csv").open() as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == [1, 2, 3, 4, 5, 6]  # resumed at step 4 from the checkpoint, nothing redone
    assert len(list((out / "ray").rglob("checkpoint_*"))) >= 1

    per_image = MaskedTeacher(teacher).gflops(32)  # keep 0.5 of the 8x8 grid
    for r in rows:
        assert r["gflops"] == pytest.approx(r["images"] * per_image, rel=1e-9)
    # request ids are <attempt uid>-w<rank>-s<step>-m<micro-batch>; the run after the restart has new uids
    parts = [r["request_id"].split("-") for r in rows]  # [uid, "w<rank>", "s<step>", "m<i>"]
    first_attempt = {p[0] for p in parts if p[2] == "s0"}
    orphans = [r for r, p in zip(rows, parts) if p[0] in first_attempt and p[2] == "s3"]
    # only rank 1 got into step 3 (its teacher work is billed, its step never completed): at most its 2 micro-batches
    assert all("-w1-" in r["request_id"] for r in orphans) and len(orphans) <= 2
    counted = [r for r in rows if r not in orphans]
    assert len(counted) == 6 * 2 * 2  # steps x workers x micro-batches
    assert sum(r["images"] for r in counted) == 80
    assert summary["teacher_gflops"] == pytest.approx(sum(r["gflops"] for r in counted), rel=1e-9)
    assert summary["teacher_saving"] == pytest.approx(1 - per_image / MaskedTeacher(teacher).gflops(64), rel=1e-6)
    assert 0.0 <= summary["overlap"] <= 1.0

    # the teacher server can load the trained student with no extra flags
    student, meta = load_model(checkpoint=out / "model.safetensors")
    assert meta.model_name == STUDENT and meta.model_kwargs["num_classes"] == 10
    assert meta.extra["epochs_done"] == 2


def test_a_worker_crash_without_retries_left_is_one_line(local_ray: None, tmp_path: Path) -> None:
    data = make_subset(tmp_path / "data", train_per_class=1, test_per_class=1)
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "run"), mode="none", student=STUDENT,
                      student_kwargs=STUDENT_KWARGS, workers=2, batch_size=4, max_failures=0, fail_at_step=0,
                      progress=False)
    with pytest.raises(TrainingError) as err:
        run_with_ray(cfg)
    assert str(err.value) == "RuntimeError: injected failure at step 0"
