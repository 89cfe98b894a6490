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
from student_testkit import STUDENT, STUDENT_KWARGS, ledger_rows, make_subset, teacher_server, tiny_config, tiny_teacher
from timm_attention import timm_blocks_with_attention

from maskedkd.masked_teacher import MaskedTeacher
from student_client import MaskedKD
from student_client.client import TeacherClient
from student_client.context import LocalContext
from student_client.train_loop import run_training

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
