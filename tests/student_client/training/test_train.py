"""The per-worker training loop in-process (no Ray) against a real teacher server: every mode and strategy, the
ledger against the FLOP model, what the teacher sees, head-only training, checkpoint and resume."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from student_testkit import (
    STUDENT,
    STUDENT_KWARGS,
    ScalarReads,
    ledger_rows,
    make_subset,
    teacher_server,
    tiny_config,
    tiny_teacher,
)
from torch.utils.data import DataLoader

from maskedkd.checkpoints import load_state_dict
from maskedkd.masked_teacher import MaskedTeacher
from student_client.config import TrainConfig
from student_client.data import Normalizer, build_datasets, build_mixup
from student_client.distill.losses import DistillationLoss, kd_kl_loss
from student_client.distill.sips import SIPSCapture
from student_client.distill.train_step import PatchSelector, StepRunner
from student_client.student import create_student, describe_student, student_kwargs_for
from student_client.training.checkpointing import latest_checkpoint
from student_client.training.context import LocalContext
from student_client.training.train_loop import run_training
from student_client.transport.client import TeacherClient

pytestmark = pytest.mark.dtype("float32")  # compared with float32 references, on the CPU


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("train")
    data = make_subset(root / "data", train_per_class=2, test_per_class=1)  # 20 train / 10 test images
    model = tiny_teacher()
    with teacher_server(root, model) as srv:
        yield {"root": root, "data": data, "srv": srv, "ref": MaskedTeacher(model)}


def config(env: dict[str, Any], name: str, **overrides: Any) -> TrainConfig:
    key = env["srv"].create_key(name) if overrides.get("mode", "kd") != "none" else None
    teacher = {"teacher": env["srv"].address, "api_key": key}
    fields = {**teacher, "epochs": 1, "batch_size": 8, "max_steps": 2, "micro_batches": 2, **overrides}
    return tiny_config(env["data"], fields.pop("out", env["root"] / name), **fields)


@pytest.mark.parametrize(
    "mode,strategy,extra,kept",
    [
        ("kd", "sips", {}, 32),
        ("kd", "random", {"transport": "unary"}, 32),
        ("kd", "bottom", {"keep": 0.25}, 16),
        ("kd", "all", {}, 64),
        ("kd", "sips", {"student": "deit_tiny_distilled_patch16_224", "augment": "heavy", "hard": True}, 32),
        ("mask-student", "sips", {}, 64),  # the teacher sees full images; the student is masked
    ],
)
def test_every_strategy_trains_and_the_ledger_matches_the_flop_model(
    env: dict[str, Any], mode: str, strategy: str, extra: dict[str, Any], kept: int
) -> None:
    name = f"{mode}-{strategy}-{len(extra)}"
    cfg = config(env, name, mode=mode, strategy=strategy, **extra)
    summary = run_training(cfg, LocalContext())
    assert summary["fatal_error"] == "" and summary["global_step"] == 2 and summary["images_seen"] == 16
    rows = ledger_rows(env["srv"], name)
    assert len(rows) == 2 * 2  # 2 steps x 2 micro-batches, one request each
    per_image = env["ref"].gflops(kept)
    for row in rows:
        assert row["gflops"] == pytest.approx(row["images"] * per_image, rel=1e-9)
        assert row["full_gflops"] == pytest.approx(row["images"] * env["ref"].gflops(64), rel=1e-9)
    assert sum(r["images"] for r in rows) == 16
    assert summary["teacher_gflops"] == pytest.approx(sum(r["gflops"] for r in rows), rel=1e-9)
    assert summary["teacher_saving"] == pytest.approx(1 - per_image / env["ref"].gflops(64), rel=1e-6)
    assert summary["val_images"] == 10 and 0 <= summary["val_top1"] <= summary["val_top5"] <= 100
    steps_csv = (Path(cfg.out) / "metrics_steps.csv").read_text().splitlines()
    assert len(steps_csv) == 3 and steps_csv[0].startswith("step,epoch,loss")


def test_mode_none_needs_no_teacher_and_head_only_freezes_the_backbone(env: dict[str, Any]) -> None:
    cfg = config(env, "none-head", mode="none", teacher=None, train_head_only=True, max_steps=None, epochs=1)
    torch.manual_seed(cfg.seed)  # run_training seeds the same way: this is the initial student
    initial = create_student(STUDENT, student_kwargs_for(STUDENT_KWARGS, 10)).state_dict()
    summary = run_training(cfg, LocalContext())
    assert summary["teacher_requests"] == 0 and summary["global_step"] == 3  # ceil(20 / 8)
    trained = load_state_dict(Path(cfg.out) / "model.safetensors")
    changed = {k for k in initial if not torch.equal(initial[k], trained[k])}
    assert changed == {"head.weight", "head.bias"}


def test_teacher_sees_exactly_the_augmented_pixels_and_the_loss_uses_its_logits(env: dict[str, Any]) -> None:
    cfg = config(env, "pixels", augment="heavy", micro_batches=2)
    torch.manual_seed(0)
    student = create_student(STUDENT, student_kwargs_for(STUDENT_KWARGS, 10))
    spec = describe_student(student)
    seen_by_student: list[torch.Tensor] = []
    student.register_forward_pre_hook(lambda m, args: seen_by_student.append(args[0].detach().clone()))
    client = TeacherClient(cfg.teacher or "", cfg.api_key or "")
    sent: list[dict[str, Any]] = []

    def submit(**kwargs: Any):  # type: ignore[no-untyped-def]
        sent.append(kwargs)
        return client.submit(**kwargs)

    train, _, _ = build_datasets(cfg.data, spec.image_size, "heavy")
    images, labels = next(iter(DataLoader(train, batch_size=8, shuffle=True)))
    images, targets = build_mixup(10, "heavy")(images, labels)  # soft targets, pixels no longer k/255
    normalize = Normalizer(spec.mean, spec.std, torch.device("cpu"))
    selector = PatchSelector(cfg, SIPSCapture(student), spec.grid_size, (8, 8), torch.Generator().manual_seed(0))
    criterion = DistillationLoss(cfg.lambda_kd, cfg.tau)
    result = StepRunner(cfg, student, student, normalize, criterion, selector, submit, "px")(images, targets, 0)

    teacher_pixels = torch.cat([s["images"] for s in sent])
    assert torch.equal(teacher_pixels, images)  # un-normalized, after crop/flip/RandAugment/mixup
    torch.testing.assert_close(normalize(teacher_pixels), torch.cat(seen_by_student))
    keep = torch.cat([s["keep_indices"] for s in sent])
    assert keep.shape == (8, 32)
    ref = env["ref"]
    mean, std = torch.tensor(ref.geometry.mean).view(1, 3, 1, 1), torch.tensor(ref.geometry.std).view(1, 3, 1, 1)
    t_norm = (images.half().float() - mean) / std
    with torch.no_grad():
        teacher_logits = ref(t_norm, keep)
        student_logits = student(normalize(images))
    expected = float(kd_kl_loss(student_logits, teacher_logits, 1.0))
    # The server may batch the two micro-batches together and the step ran the student on them apart, so logits
    # differ by float32 kernel noise (~1e-6); the KL itself is small, hence a relative tolerance of 2e-3 ...
    assert float(result.loss.kd) == pytest.approx(expected, rel=2e-3)
    with torch.no_grad():
        unmasked = float(kd_kl_loss(student_logits, ref(t_norm), 1.0))
    assert abs(unmasked - expected) > 2e-3 * expected  # ... which still tells masked from full teacher logits
    assert result.usage.gflops == pytest.approx(8 * ref.gflops(32), rel=1e-9)


def test_checkpoint_and_resume_restore_optimizer_scheduler_and_epoch(env: dict[str, Any]) -> None:
    cfg = config(env, "resume", epochs=1, max_steps=None)
    first = run_training(cfg, LocalContext())
    assert first["epochs_done"] == 1 and first["global_step"] == 3
    ckpt = latest_checkpoint(cfg.out)
    assert ckpt is not None and ckpt.name == "epoch_0001"
    saved = load_state_dict(ckpt / "model.safetensors")

    resumed_cfg = config(env, "resume-2", out=cfg.out, api_key=cfg.api_key, epochs=3, max_steps=5, resume=True)
    second = run_training(resumed_cfg, LocalContext())
    assert second["epochs_done"] == 1 and second["global_step"] == 5  # stopped 2 steps into epoch 2
    assert second["steps_into_epoch"] == 2 and first["steps_into_epoch"] == 0
    mid = latest_checkpoint(cfg.out)
    assert mid is not None and mid.name == "step_000005"
    state = torch.load(mid / "train_state.pt", weights_only=False)
    # AdamW's step counter only reaches 5 if the optimizer state of the first run was restored
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {5.0}
    assert all(g["fused"] for g in state["optimizer"]["param_groups"])  # torch's fused AdamW on the CPU, resumed
    assert state["scheduler"]["last_epoch"] == 5 and state["state"]["batches_into_epoch"] == 2
    assert [h["epoch"] for h in state["state"]["history"]] == [0, 1]
    # the second run started from the saved weights, not from a fresh init
    assert not torch.equal(saved["head.weight"], load_state_dict(mid / "model.safetensors")["head.weight"])

    third = run_training(
        config(
            env, "resume-3", out=cfg.out, api_key=cfg.api_key, epochs=2, max_steps=None, resume=True, keep_checkpoints=2
        ),
        LocalContext(),
    )
    assert third["epochs_done"] == 2 and third["global_step"] == 6  # finished epoch 2: one batch left
    assert third["steps_into_epoch"] == 0
    assert sorted(p.name for p in (Path(cfg.out) / "checkpoints").iterdir()) == ["epoch_0002", "step_000005"]
    assert third["teacher_gflops"] == pytest.approx(sum(r["gflops"] for r in ledger_rows(env["srv"], "resume")))


def test_a_higher_resolution_teacher_gets_resized_images_and_sips_on_its_grid(env: dict[str, Any]) -> None:
    teacher = tiny_teacher(img_size=48, patch_size=8)  # 6x6 grid; the student has 8x8 at 32 px (App. B)
    with teacher_server(env["root"] / "hires", teacher) as srv:
        cfg = config(env, "hires", teacher=srv.address, api_key=srv.create_key("hires"), max_steps=1)
        summary = run_training(cfg, LocalContext())
        rows = ledger_rows(srv, "hires")
    assert summary["fatal_error"] == "" and sum(r["images"] for r in rows) == 8
    per_image = MaskedTeacher(teacher).gflops(18)  # floor(0.5 * 36)
    assert all(r["gflops"] == pytest.approx(r["images"] * per_image, rel=1e-9) for r in rows)


@pytest.mark.parametrize("mode", ["none", "kd"])
def test_a_step_reads_no_number_between_its_forward_and_its_backward(env: dict[str, Any], mode: str) -> None:
    """The step's numbers (loss, ...) are read after the optimizer step: a read between the forward and the backward
    would make the host wait for the forward before queuing the backward on a GPU. Checked on the CPU, float32, by
    the order of the reads (`aten._local_scalar_dense`, what such a read runs on any device)."""
    overrides: dict[str, Any] = {"mode": "none", "teacher": None} if mode == "none" else {}
    cfg = config(env, f"no-read-{mode}", max_steps=2, micro_batches=1, eval=False, **overrides)
    recorder = ScalarReads()
    with recorder:
        summary = run_training(cfg, LocalContext())
    assert summary["global_step"] == 2
    assert recorder.between_forward_and_backward() == [0, 0]


def test_quota_exhausted_mid_run_stops_cleanly_with_the_reason(env: dict[str, Any]) -> None:
    one_step = 8 * env["ref"].gflops(32)
    cfg = config(env, "quota", max_steps=4)
    srv = env["srv"]
    cfg.api_key = srv.create_key("quota-small", quota_gflops=1.5 * one_step)
    summary = run_training(cfg, LocalContext())
    assert "quota" in summary["fatal_error"] and "\n" not in summary["fatal_error"]
    assert summary["global_step"] == 1  # the second step's teacher call was refused; no optimizer step for it
    billed = sum(r["gflops"] for r in ledger_rows(srv, "quota-small"))
    assert billed <= 1.5 * one_step + 1e-9
    assert summary["teacher_gflops"] == pytest.approx(one_step, rel=1e-9)


def test_a_diverged_run_stops_at_the_first_step_whose_loss_is_not_finite(env: dict[str, Any]) -> None:
    """float32 on the CPU. AdamW at lr 1e38 moves every weight by ~1e38 a step, so the student's forward soon
    overflows. The student's NaN scores still pick patches and the teacher still answers (and bills) every such step,
    so the run must stop itself: after the first step whose loss is not finite, with a one-line reason, that step's
    teacher calls billed and counted, none after it, and no checkpoint of the diverged weights."""
    cfg = config(env, "diverged", epochs=4, max_steps=8, lr=1e38)
    summary = run_training(cfg, LocalContext())
    error, steps = summary["fatal_error"], summary["global_step"]
    assert "loss became nan" in error.lower() or "loss became inf" in error.lower(), error
    assert "\n" not in error and f"at step {steps} " in error
    assert 1 < steps < 8
    with (Path(cfg.out) / "metrics_steps.csv").open(newline="") as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    assert len(losses) == steps and not math.isfinite(losses[-1]) and all(map(math.isfinite, losses[:-1]))
    rows = ledger_rows(env["srv"], "diverged")
    assert len(rows) == steps * 2  # 2 micro-batches a step, every step up to the diverged one, none after
    assert summary["teacher_gflops"] == pytest.approx(sum(float(r["gflops"]) for r in rows), rel=1e-9)
    assert summary["teacher_requests"] == len(rows)
    last = latest_checkpoint(cfg.out)
    saved = 0 if last is None else torch.load(last / "train_state.pt", weights_only=False)["state"]["global_step"]
    assert saved < steps


def test_a_resumed_run_sends_the_bytes_of_an_uninterrupted_one_with_heavy_augment_and_random_patches(
    env: dict[str, Any],
) -> None:
    """RandAugment, mixup/cutmix (float16 on the wire) and the random patch choice are drawn from (seed, epoch,
    step/index, rank), not from how far the process got: a run stopped mid-epoch and resumed sends what one
    uninterrupted run sends, under the same ids (its run id kept in out/run_id)."""
    common = dict(epochs=3, max_steps=None, augment="heavy", strategy="random")  # 2 steps of 8 per epoch

    def digests(out: Path) -> dict[str, str]:
        run_id = (out / "run_id").read_text().strip()
        lines = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
        return {str(e["request_id"]).removeprefix(run_id): str(e["content_sha256"]) for e in lines}

    straight = config(env, "det-straight", **common)
    run_training(straight.replace(request_log=str(Path(straight.out) / "requests.jsonl")), LocalContext())
    stopped = config(env, "det-stopped", **common)
    # ... and in a DataLoader worker process rather than in the training process
    stopped = stopped.replace(request_log=str(Path(stopped.out) / "requests.jsonl"), loader_workers=1)
    assert run_training(stopped.replace(max_steps=3), LocalContext())["global_step"] == 3  # mid-epoch 2
    run_id = (Path(stopped.out) / "run_id").read_text()
    assert run_training(stopped.replace(resume=True), LocalContext())["global_step"] == 6
    assert (Path(stopped.out) / "run_id").read_text() == run_id

    expected = digests(Path(straight.out))
    assert sorted(expected) == sorted(f"-e{s // 2}-w0-s{s}-m{m}" for s in range(6) for m in range(2))
    assert digests(Path(stopped.out)) == expected
