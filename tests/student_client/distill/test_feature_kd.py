"""Manifold and Attention distillation through the service (`kd="manifold"|"attention"`, `--kd`), against a real
teacher server: the step's loss against an independent reference (SIPS, the teacher's kept-patch attention and the
student's attention computed here from timm's modules), the bill equal to logit KD's (the features are by-products of
the billed masked forward), and `student-client train --kd ...` at keep 50% billing half the full teacher."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
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
from timm_attention import timm_blocks_with_attention

from maskedkd.masked_teacher import MaskedTeacher
from student_client import MaskedKD
from student_client.distill.feature_kd import feature_kd_loss
from student_client.distill.feature_step import FeatureDistiller
from student_client.distill.pipeline import TeacherRequest
from student_client.training.context import LocalContext
from student_client.training.train_loop import run_training
from student_client.transport.client import TeacherClient

pytestmark = pytest.mark.dtype("float32", device="cpu")  # compared with float32 references

BATCH = 6


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("feature-kd")
    teacher = tiny_teacher()
    data = make_subset(root / "data", train_per_class=2, test_per_class=1)
    with teacher_server(root, teacher) as srv:
        yield {"srv": srv, "teacher": teacher, "root": root, "data": data}


def _attention_rows(model: torch.nn.Module, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Each block's class-token attention row [B, H, n] of timm's own blocks on tokens [B, n, D]."""
    return [p[:, :, 0] for p in timm_blocks_with_attention(model, tokens)[1]]


def _normalized(model: torch.nn.Module, x: torch.Tensor, cfg: dict[str, Any]) -> torch.Tensor:
    return (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)


def _kl_over_kept(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Per row KL of the two maps renormalized over the kept patches: [..., K] -> [...]."""
    p_t, p_s = t / t.sum(-1, keepdim=True), s / s.sum(-1, keepdim=True)
    return (p_t * (p_t.log() - p_s.log())).sum(-1)


def test_attention_kd_loss_is_ce_plus_kd_plus_the_kept_patch_attention_kl(env: dict[str, Any]) -> None:
    torch.manual_seed(1)
    student = timm.create_model(STUDENT, pretrained=False, **{**STUDENT_KWARGS, "num_classes": 10}).train()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (BATCH, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (BATCH,), generator=g)
    name = "attention-loss"
    with (
        TeacherClient(env["srv"].address, env["srv"].create_key(name), patience_s=5) as client,
        MaskedKD(
            student, client, keep=0.5, kd="attention", feature_weight=2.0, lambda_kd=0.5, micro_batches=1, run_id=name
        ) as kd,
    ):
        loss = kd(images.float() / 255, labels)
        loss.backward()
    # the independent reference: SIPS of the student's last block, both models' kept-patch attention from timm's blocks
    x = images.float() / 255
    xs = _normalized(student, x, student.pretrained_cfg)
    s_rows = _attention_rows(student, student._pos_embed(student.patch_embed(xs)))  # per block [B, H, 65]
    kept = s_rows[-1][:, :, 1:].sum(dim=1).topk(32, dim=1).indices.sort(dim=1).values  # SIPS top-32, [B, 32]
    teacher, masked = env["teacher"], MaskedTeacher(env["teacher"])
    xt = (x - torch.tensor(masked.geometry.mean).view(1, 3, 1, 1)) / torch.tensor(masked.geometry.std).view(1, 3, 1, 1)
    with torch.no_grad():
        patches = teacher.patch_embed(xt)  # [B, 64, D]
        idx = kept[..., None].expand(-1, -1, patches.shape[-1])
        tokens = patches.gather(1, idx) + teacher.pos_embed[0, 1:][kept]  # [B, 32, D]
        cls = (teacher.cls_token + teacher.pos_embed[:, :1]).expand(BATCH, -1, -1)
        t_rows = _attention_rows(teacher, torch.cat([cls, tokens], dim=1))  # per block [B, H, 33]
        t_logits = masked(xt, kept)
        s_logits = student(xs)
    attention_kl = torch.stack(
        [
            _kl_over_kept(t[:, :, 1:].mean(dim=1), s[:, :, 1:].mean(dim=1).gather(1, kept))
            for t, s in zip(t_rows, s_rows, strict=True)  # 2 blocks each: block l <-> block l
        ]
    ).mean()
    p_t = t_logits.softmax(dim=1)
    kl = (p_t * (p_t.log() - s_logits.log_softmax(dim=1))).sum(dim=1).mean()
    expected = F.cross_entropy(s_logits, labels) + 0.5 * kl + 2.0 * attention_kl
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-5)
    assert kd.last.feature == pytest.approx(2.0 * float(attention_kl), rel=1e-4)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    rows = ledger_rows(env["srv"], name)
    assert len(rows) == 1 and rows[0]["gflops"] == pytest.approx(BATCH * masked.gflops(32), rel=1e-9)


@pytest.mark.parametrize("kind", ["manifold", "attention"])
def test_train_with_feature_kd_at_keep_half_bills_the_masked_teacher(env: dict[str, Any], kind: str) -> None:
    name = f"train-{kind}"
    out = Path(env["root"]) / name
    cfg = tiny_config(
        env["data"],
        out,
        env["srv"],
        env["srv"].create_key(name),
        kd=kind,
        keep=0.5,
        epochs=1,
        batch_size=8,
        max_steps=2,
        micro_batches=2,
    )
    summary = run_training(cfg, LocalContext())
    assert summary["fatal_error"] == "" and summary["global_step"] == 2
    masked = MaskedTeacher(env["teacher"])
    rows = ledger_rows(env["srv"], name)
    assert len(rows) == 4 and sum(r["images"] for r in rows) == 16
    for row in rows:  # the features cost nothing beyond the masked forward: billed as logit KD at keep 50%
        assert row["gflops"] == pytest.approx(row["images"] * masked.gflops(32), rel=1e-9)
    assert summary["teacher_saving"] == pytest.approx(1 - masked.gflops(32) / masked.gflops(64), rel=1e-6)
    with (out / "metrics_steps.csv").open() as f:
        steps = list(csv.DictReader(f))
    assert len(steps) == 2 and all(float(s["feature"]) > 0 for s in steps)
    for s in steps:  # the CSV keeps 6 significant digits
        assert float(s["loss"]) == pytest.approx(float(s["ce"]) + float(s["kd"]) + float(s["feature"]), rel=1e-4)


def test_a_teacher_that_cannot_answer_features_is_refused_at_construction(env: dict[str, Any]) -> None:
    root = Path(env["root"]) / "tome"
    root.mkdir()
    with teacher_server(root, env["teacher"], tome_r=2) as srv:
        student = timm.create_model(STUDENT, pretrained=False, **{**STUDENT_KWARGS, "num_classes": 10})
        with (
            TeacherClient(srv.address, srv.create_key("no-features")) as client,
            pytest.raises(ValueError, match="needs the teacher's patch_tokens"),
        ):
            MaskedKD(student, client, kd="manifold")


@pytest.mark.parametrize("kind", ["manifold", "attention"])
def test_a_feature_kd_step_reads_no_number_between_its_forward_and_its_backward(env: dict[str, Any], kind: str) -> None:
    """The feature term checks the teacher's features where they arrive (the client's thread) and draws its masks and
    samples at fixed shapes, so the training thread reads no value between the student's forward and its backward:
    on a GPU each such read waits for the forward before the backward can be queued. Checked on the CPU, float32, by
    the order of the reads (`aten._local_scalar_dense`, what such a read runs on any device)."""
    name = f"no-read-{kind}"
    cfg = tiny_config(
        env["data"], Path(env["root"]) / name, env["srv"], env["srv"].create_key(name), kd=kind, keep=0.5,
        batch_size=8, max_steps=2, micro_batches=2, eval=False,
    )  # fmt: skip
    recorder = ScalarReads()
    with recorder:
        summary = run_training(cfg, LocalContext())
    assert summary["fatal_error"] == "" and summary["global_step"] == 2
    assert recorder.between_forward_and_backward() == [0, 0]


def test_a_teacher_answering_nan_features_stops_training_with_one_line(env: dict[str, Any]) -> None:
    """Features that cannot be distilled (here NaN patch tokens from a teacher whose final norm is broken) are refused
    where the answer arrives: the run stops with a one-line reason before any optimizer step, float32 on the CPU."""
    root = Path(env["root"]) / "nan-teacher"
    root.mkdir()
    broken = tiny_teacher()
    with torch.no_grad():
        broken.norm.weight[0] = float("nan")  # the final norm: patch_tokens (and logits) carry NaN
    with teacher_server(root, broken) as srv:
        cfg = tiny_config(env["data"], root / "run", srv, srv.create_key("nan"), kd="manifold", keep=0.5, max_steps=2)
        summary = run_training(cfg, LocalContext())
    error = summary["fatal_error"]
    assert "cannot be distilled" in error and "NaN" in error and "\n" not in error
    assert summary["global_step"] == 0


CUDA = pytest.param(
    "cuda",
    marks=[
        pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
        pytest.mark.dtype("float32", device="cuda"),
    ],
)


@pytest.mark.parametrize("device_type", ["cpu", CUDA])
@pytest.mark.parametrize("kind", ["manifold", "attention"])
def test_the_step_feature_term_equals_the_checked_loss_without_waiting_for_the_device(
    env: dict[str, Any], kind: str, device_type: str
) -> None:
    """The training step's feature term (`FeatureDistiller.loss`) of ragged rows (`--keep-mass`) against a real
    answer equals the checked `feature_kd_loss` on the CPU; on a GPU the answer's features arrive pinned and the term
    is queued under `torch.cuda.set_sync_debug_mode("error")`: no host sync between the student's forward and its
    backward, and no host copy of the features on the training thread."""
    device = torch.device(device_type)
    torch.manual_seed(2)
    student = timm.create_model(STUDENT, pretrained=False, **{**STUDENT_KWARGS, "num_classes": 10}).to(device)
    grid = (8, 8)  # 32 px, 4 px patches: the student's grid and the teacher's
    distiller = FeatureDistiller(kind, 1.5, student, student_grid=grid, teacher_grid=grid)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(4, 3, 32, 32, generator=g)  # [B, C, H, W]
    keep = torch.stack([torch.randperm(64, generator=g)[:32].sort().values for _ in range(4)])  # [B, 32]
    counts = torch.tensor([32, 20, 7, 32])  # [B] ragged rows
    with TeacherClient(env["srv"].address, env["srv"].create_key(f"term-{kind}-{device_type}")) as client:
        submit = distiller.checked(client.submit)  # as the step sends: checked (and pinned for a GPU) on arrival
        on_device = {"images": x.to(device), "keep_indices": keep.to(device), "keep_counts": counts.to(device)}
        answer = submit(**on_device, outputs=(distiller.output,)).result(60)
    assert answer.outputs[distiller.output].is_pinned() == (device.type == "cuda")
    distiller.begin_step()
    student(x.to(device))  # the capture keeps the student's features with their graph
    distiller.after_forward()
    request = TeacherRequest(x.to(device), keep.to(device), counts.to(device), outputs=(distiller.output,))
    distiller.generator.manual_seed(4)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any host sync in the block raises
    try:
        term = distiller.loss([request], [answer.outputs])
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    term.backward()
    captured = distiller.capture.tokens if kind == "manifold" else distiller.capture.attention
    checked = feature_kd_loss(
        distiller.config,
        captured.detach().cpu().float(),
        answer.outputs[distiller.output],
        keep,
        counts,
        student_grid=grid,
        teacher_grid=grid,
        generator=torch.Generator().manual_seed(4),
    )
    torch.testing.assert_close(term.detach().cpu(), checked, rtol=1e-5, atol=1e-6)
    assert float(checked) > 0 and all(p.grad is None or torch.isfinite(p.grad).all() for p in student.parameters())
    distiller.close()
