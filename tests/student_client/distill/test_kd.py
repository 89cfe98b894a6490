"""MaskedKD (student_client/distill/kd.py) against a real teacher server: the loss against an independent reference
(SIPS, teacher and KL computed here from timm's modules), the bill against the FLOP model and the ledger read with SQL,
uint8 = float inputs, a retried step replayed unbilled, and one clear error per bad pairing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from student_testkit import STUDENT, STUDENT_KWARGS, ScalarReads, ledger_rows, teacher_server, tiny_teacher

from maskedkd.flops import ViTShape, masked_forward_flops
from maskedkd.masked_teacher import MaskedTeacher
from student_client import MaskedKD, SIPSUnsupportedModelError
from student_client.errors import TeacherAuthError
from student_client.transport.client import TeacherClient

pytestmark = pytest.mark.dtype("float32")  # compared with float32 references, on the CPU

BATCH = 8


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("kd")
    teacher = tiny_teacher()
    with teacher_server(root, teacher) as srv:
        yield {"srv": srv, "teacher": teacher}


def make_student(seed: int = 1, **overrides: Any) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(STUDENT, pretrained=False, **{**STUDENT_KWARGS, "num_classes": 10, **overrides}).train()


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (BATCH, 3, 32, 32), dtype=torch.uint8, generator=g)  # [B, C, H, W]
    return images, torch.randint(0, 10, (BATCH,), generator=g)


def client_for(env: dict[str, Any], name: str) -> TeacherClient:
    return TeacherClient(env["srv"].address, env["srv"].create_key(name), patience_s=5)


def independent_sips_top_k(student: torch.nn.Module, x: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """[B, K] sorted: the last block's full attention matrix, [CLS] row over the patch keys, summed over heads."""
    seen: dict[str, torch.Tensor] = {}
    last = student.blocks[-1]
    handle = last.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0].detach()))
    with torch.no_grad():
        student(x)
    handle.remove()
    attn, tokens = last.attn, last.norm1(seen["x"])  # [B, 1 + N, D]
    B, n, _ = tokens.shape
    q, key, _v = attn.qkv(tokens).reshape(B, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    probs = ((q @ key.transpose(-2, -1)) * attn.head_dim**-0.5).softmax(dim=-1)  # [B, H, n, n]
    scores = probs[:, :, 0, 1:].sum(dim=1)  # [B, N]
    return scores.topk(k, dim=1, largest=largest).indices.sort(dim=1).values


def reference_loss(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    keep: int,
    lam: float,
    tau: float,
    strategy: str,
    hard: bool,
) -> torch.Tensor:
    x = images.float() / 255
    mean = torch.tensor(student.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(student.pretrained_cfg["std"]).view(1, 3, 1, 1)
    xs = (x - mean) / std
    if strategy == "all":
        kept = torch.arange(64).expand(len(x), 64)
    else:
        kept = independent_sips_top_k(student, xs, keep, largest=strategy == "sips")
    masked = MaskedTeacher(teacher)
    with torch.no_grad():
        t_mean, t_std = (
            torch.tensor(masked.geometry.mean).view(1, 3, 1, 1),
            torch.tensor(masked.geometry.std).view(1, 3, 1, 1),
        )
        t_logits = masked((x - t_mean) / t_std, kept)  # [B, classes]
        s_logits = student(xs)
    if hard:  # DeiT's hard distillation: CE against the teacher's top-1
        return F.cross_entropy(s_logits, labels) + lam * F.cross_entropy(s_logits, t_logits.argmax(dim=1))
    p_t = (t_logits / tau).softmax(dim=1)
    kl = (p_t * (p_t.log() - (s_logits / tau).log_softmax(dim=1))).sum(dim=1).mean()
    return F.cross_entropy(s_logits, labels) + lam * tau * tau * kl


@pytest.mark.parametrize(
    "micro_batches,transport,strategy,hard",
    [
        (1, "unary", "sips", False),
        (2, "stream", "sips", False),
        (2, "unary", "bottom", False),
        (2, "unary", "all", True),
    ],
)
def test_loss_is_ce_plus_lambda_tau2_kl_of_the_masked_teacher(
    env: dict[str, Any], micro_batches: int, transport: str, strategy: str, hard: bool
) -> None:
    student = make_student()
    images, labels = batch()
    name = f"loss-{micro_batches}-{transport}-{strategy}"
    with (
        client_for(env, name) as client,
        MaskedKD(
            student,
            client,
            keep=0.5,
            lambda_kd=0.7,
            tau=2.0,
            hard=hard,
            strategy=strategy,
            micro_batches=micro_batches,
            transport=transport,
            run_id=name,
        ) as kd,
    ):
        loss = kd(images.float() / 255, labels)
        loss.backward()
    expected = reference_loss(
        student, env["teacher"], images, labels, keep=32, lam=0.7, tau=2.0, strategy=strategy, hard=hard
    )
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-5)
    assert kd.last.loss == pytest.approx(kd.last.ce + 0.7 * kd.last.kd, rel=1e-6)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    rows = ledger_rows(env["srv"], name)
    assert sorted(r["request_id"] for r in rows) == [f"{name}-s0-m{i}" for i in range(micro_batches)]
    assert kd.step == 1 and kd.last.usage.requests == micro_batches and 0.0 <= kd.last.overlap <= 1.0


def test_a_call_reads_no_number_before_the_backward_and_last_reads_them_after(env: dict[str, Any]) -> None:
    """`kd.last` keeps the loss parts as tensors: reading them in the call would make the host wait for the student's
    forward before the caller's backward could be queued on a GPU. On the CPU, float32: no scalar read between the
    student's forward and the backward, and the parts read afterwards add up to the loss returned."""
    student = make_student()
    images, labels = batch()
    reads = ScalarReads()
    with (
        client_for(env, "no-read") as client,
        MaskedKD(student, client, keep=0.5, lambda_kd=0.7, run_id="nr") as kd,
        reads,
    ):
        loss = kd(images, labels)
        loss.backward()
    assert reads.between_forward_and_backward() == [0]
    assert kd.last.loss == pytest.approx(float(loss.detach()), rel=1e-6)
    assert kd.last.loss == pytest.approx(kd.last.ce + 0.7 * kd.last.kd, rel=1e-6)
    assert kd.last.kd > 0 and kd.last.feature != kd.last.feature  # NaN: logit KD has no feature term


def test_keep_half_bills_the_flop_model_and_the_ledger(env: dict[str, Any]) -> None:
    shape = ViTShape.from_model(env["teacher"])
    per_image = {k: masked_forward_flops(shape, k).total / 1e9 for k in (32, 64)}
    with client_for(env, "bill") as client, MaskedKD(make_student(), client, keep=0.5, run_id="bill") as kd:
        for step in range(2):
            kd(*batch(step))
    rows = ledger_rows(env["srv"], "bill")
    assert len(rows) == 4 and sum(r["images"] for r in rows) == 2 * BATCH
    assert kd.last.billed.gflops == pytest.approx(BATCH * per_image[32], rel=1e-9)
    assert kd.total_billed.gflops == pytest.approx(sum(r["gflops"] for r in rows), rel=1e-12)
    assert kd.total_billed.cost == pytest.approx(sum(r["cost"] for r in rows), rel=1e-12)
    assert kd.total_billed.full_gflops == pytest.approx(2 * BATCH * per_image[64], rel=1e-9)
    ratio = kd.total_billed.gflops / kd.total_billed.full_gflops
    assert ratio == pytest.approx(per_image[32] / per_image[64], rel=1e-9) and 0.4 < ratio < 0.55


def test_uint8_and_float_give_the_same_loss_and_a_retried_step_is_not_billed_again(env: dict[str, Any]) -> None:
    student = make_student()
    images, labels = batch(3)
    with client_for(env, "retry") as client:
        with MaskedKD(student, client, run_id="retry") as first:
            from_float = first(images.float() / 255, labels, step=7)
        with MaskedKD(student, client, run_id="retry") as again:  # a resumed run re-sends step 7
            from_uint8 = again(images, labels, step=7)
        assert client.mismatched_requests == 0  # the same bytes went out: the teacher replayed, not refused
    assert torch.equal(from_float.detach(), from_uint8.detach())
    assert first.last.billed.gflops > 0 and again.last.usage.replayed and again.last.billed.requests == 0
    assert again.total_billed.gflops == 0.0 and again.last.usage.gflops == first.last.billed.gflops
    assert sorted(r["request_id"] for r in ledger_rows(env["srv"], "retry")) == ["retry-s7-m0", "retry-s7-m1"]


@pytest.mark.parametrize(
    "student_kwargs,kd_kwargs,error,message",
    [
        ({"num_classes": 5}, {}, ValueError, "predicts 10 classes, the student 5"),
        ({}, {"keep": 65}, ValueError, r"keep count 65 is outside \[1, 64\]"),
        ({}, {"keep": 1.5}, ValueError, r"keep fraction 1.5 is outside \(0, 1\]"),
        ({}, {"strategy": "topk"}, ValueError, "strategy must be one of sips, random, bottom, all, got 'topk'"),
        ({}, {"micro_batches": 0}, ValueError, "micro_batches must be an int >= 1"),
        ({"patch_size": 8}, {"allow_resize": False}, ValueError, r"4x4 grid|\(4, 4\) patch grid"),
        ({"class_token": False, "global_pool": "avg"}, {}, SIPSUnsupportedModelError, "no class token"),
    ],
)
def test_construction_errors_are_clear(
    env: dict[str, Any], student_kwargs: dict[str, Any], kd_kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    name = f"bad-{sorted(student_kwargs.items())}-{sorted(kd_kwargs.items())}"
    with client_for(env, name) as client, pytest.raises(error, match=message):
        MaskedKD(make_student(**student_kwargs), client, **kd_kwargs)
    assert not ledger_rows(env["srv"], name)


def test_a_bad_key_fails_at_construction(env: dict[str, Any]) -> None:
    with TeacherClient(env["srv"].address, "mkd_not-a-key", patience_s=0) as client, pytest.raises(TeacherAuthError):
        MaskedKD(make_student(), client)


def test_random_strategy_without_sips_support_and_the_other_grid_is_resized(env: dict[str, Any]) -> None:
    """A student SIPS cannot hook trains with strategy random; a student on a 4x4 grid keeps 32 teacher patches."""
    with client_for(env, "random") as client:
        kd = MaskedKD(
            make_student(class_token=False, global_pool="avg"), client, keep=0.5, strategy="random", run_id="random"
        )
        assert torch.isfinite(kd(*batch())).all()
        coarse = MaskedKD(make_student(patch_size=8), client, keep=0.5, run_id="coarse")
        assert torch.isfinite(coarse(*batch())).all()
    assert coarse.last.usage.tokens == kd.last.usage.tokens == BATCH * (32 + 1)  # kept patches + [CLS]


def test_train_returns_the_summary_and_raises_one_line_on_a_bad_key(tmp_path: Path) -> None:
    """student_client.train(cfg) in-process: the summary's bill is the ledger's; a bad key is one line
    (TeacherAuthError) before training starts, and a TrainingError when the checks are skipped (what a worker meets)."""
    from student_testkit import make_subset, tiny_config

    from student_client import TrainConfig, TrainingError, train

    data = make_subset(tmp_path / "data", train_per_class=1, test_per_class=1)
    with teacher_server(tmp_path, tiny_teacher()) as srv:
        base = {"batch_size": 8, "max_steps": 1, "eval": False, "teacher_patience_s": 0}
        ok = tiny_config(data, tmp_path / "ok", srv, srv.create_key("ok"), **base)
        assert type(ok) is TrainConfig  # the package's lazily exported name is the config class
        summary = train(ok, local=True)
        rows = ledger_rows(srv, "ok")
        assert summary["global_step"] == 1 and len(rows) == 2
        assert summary["teacher_gflops"] == pytest.approx(sum(r["gflops"] for r in rows), rel=1e-12)
        bad = tiny_config(data, tmp_path / "bad", srv, "mkd_wrong", **base)
        with pytest.raises(TeacherAuthError, match=r"(?i)key") as refused:
            train(bad, local=True)
        assert "\n" not in str(refused.value)
        with pytest.raises(TrainingError, match=r"(?i)key"):
            train(bad, local=True, check=False)


class RecordingClient(TeacherClient):
    """A real client that notes when each request is handed over, beside the student's forwards."""

    def __init__(self, *args: Any, events: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.events = events

    def submit(self, images: torch.Tensor | None = None, **kwargs: Any):  # type: ignore[no-untyped-def]
        self.events.append(f"send {kwargs['request_id'].rsplit('-', 1)[1]}")
        return super().submit(images, **kwargs)


@pytest.mark.parametrize(
    "strategy,schedule",
    [
        ("sips", ["forward", "send m0", "forward", "send m1", "forward", "send m2"]),  # App. E: i's answer hides
        ("random", ["send m0", "send m1", "send m2", "forward", "forward", "forward"]),  # behind i+1's forward
        ("all", ["send m0", "send m1", "send m2", "forward", "forward", "forward"]),
    ],
)
def test_pipelining_schedule(env: dict[str, Any], strategy: str, schedule: list[str]) -> None:
    """micro_batches=3: with SIPS each request leaves right after its micro-batch's forward; random and all need no
    student, so every request leaves before the first forward. The loss is the same as unpipelined."""
    events: list[str] = []
    student = make_student()
    student.register_forward_pre_hook(lambda *_: events.append("forward"))
    images, labels = batch()
    with RecordingClient(env["srv"].address, env["srv"].create_key(f"sched-{strategy}"), events=events) as client:
        piped = MaskedKD(student, client, strategy=strategy, micro_batches=3, run_id=f"sched-{strategy}")(
            images, labels
        )
        assert events == schedule
        events.clear()
        whole = MaskedKD(student, client, strategy=strategy, micro_batches=1, run_id=f"whole-{strategy}")(
            images, labels
        )
    torch.testing.assert_close(piped, whole, rtol=1e-5, atol=1e-6)
