"""The MaskedKD loss against sums written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from student_client.distill.losses import DistillationLoss, kd_kl_loss

pytestmark = pytest.mark.dtype("float32")  # compared with float32 references, on the CPU


def softmax_rows(logits: list[list[float]], tau: float) -> list[list[float]]:
    out = []
    for row in logits:
        exps = [math.exp(v / tau) for v in row]
        total = sum(exps)
        out.append([e / total for e in exps])
    return out


def hand_kd(student: list[list[float]], teacher: list[list[float]], tau: float) -> float:
    """KL(p_t || p_s) summed over classes, averaged over the batch, times tau^2."""
    ps, pt = softmax_rows(student, tau), softmax_rows(teacher, tau)
    kl = [
        sum(t * (math.log(t) - math.log(s)) for s, t in zip(rs, rt, strict=True)) for rs, rt in zip(ps, pt, strict=True)
    ]
    return sum(kl) / len(kl) * tau * tau


def hand_ce(student: list[list[float]], labels: list[int]) -> float:
    p = softmax_rows(student, 1.0)
    return -sum(math.log(p[i][y]) for i, y in enumerate(labels)) / len(labels)


S = [[2.0, -1.0, 0.5, 0.0], [0.1, 0.2, 3.0, -2.0], [-1.0, 1.5, 0.0, 0.3]]
T = [[1.0, 0.0, 2.0, -1.0], [0.0, 0.5, 2.5, -1.0], [2.0, -0.5, 1.0, 0.0]]
Y = [0, 2, 1]


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("lam", [0.0, 1.0, 0.5])
def test_ce_plus_lambda_kd_matches_hand_computation(tau: float, lam: float) -> None:
    s, t, y = torch.tensor(S, requires_grad=True), torch.tensor(T), torch.tensor(Y)
    parts = DistillationLoss(lambda_kd=lam, tau=tau)(s, y, t)
    assert float(parts.ce) == pytest.approx(hand_ce(S, Y), rel=1e-5)
    assert float(parts.kd) == pytest.approx(hand_kd(S, T, tau), rel=1e-5)
    assert float(parts.total.detach()) == pytest.approx(hand_ce(S, Y) + lam * hand_kd(S, T, tau), rel=1e-5)
    parts.total.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_kd_is_zero_for_identical_logits_and_hard_uses_teacher_argmax() -> None:
    s = torch.tensor(S)
    assert float(kd_kl_loss(s, s.clone(), 3.0)) == pytest.approx(0.0, abs=1e-6)
    parts = DistillationLoss(hard=True)(s, torch.tensor(Y), torch.tensor(T))
    teacher_top = [max(range(4), key=lambda c: row[c]) for row in T]  # [2, 2, 0]
    assert float(parts.kd) == pytest.approx(hand_ce(S, teacher_top), rel=1e-5)


def test_soft_targets_and_distillation_head() -> None:
    soft = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.0, 0.0, 1.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    s = torch.tensor(S)
    p = softmax_rows(S, 1.0)
    expected_ce = (
        -sum(sum(q * math.log(pc) for q, pc in zip(soft[i].tolist(), p[i], strict=True)) for i in range(3)) / 3
    )
    none_mode = DistillationLoss()(s, soft, None)
    assert float(none_mode.total) == pytest.approx(expected_ce, rel=1e-5) and float(none_mode.kd) == 0

    # DeiT distilled: (cls, dist) heads; CE on the class head, KD on the distillation head
    cls_head, dist_head = torch.tensor(S), torch.tensor(T) * 0.3
    parts = DistillationLoss(lambda_kd=1.0, tau=2.0)((cls_head, dist_head), torch.tensor(Y), torch.tensor(T))
    assert float(parts.ce) == pytest.approx(hand_ce(S, Y), rel=1e-5)
    assert float(parts.kd) == pytest.approx(hand_kd((torch.tensor(T) * 0.3).tolist(), T, 2.0), rel=1e-5)
