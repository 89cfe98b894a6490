"""The MaskedKD objective, paper Eq. (1): CE(student, y) + lambda * KD(student, masked teacher).

KD is the official code's form: KL(softmax(t / tau) || softmax(s / tau)), batch-mean, times tau^2; or, with `hard`,
CE against the teacher's argmax (DeiT's hard distillation). Mixup/cutmix targets are soft: CE becomes soft-target CE.
A student with a distillation token returns (cls_logits, dist_logits) in training: CE goes on the class head and KD
on the distillation head, as DeiT does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from torch import nn

StudentOutput = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def kd_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """[B, C], [B, C] -> scalar: KL(p_t || p_s) at temperature tau, batchmean, times tau^2."""
    return F.kl_div(
        F.log_softmax(student_logits / tau, dim=1),
        F.log_softmax(teacher_logits.float() / tau, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (tau * tau)


def hard_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """CE against the teacher's top-1 class."""
    return F.cross_entropy(student_logits, teacher_logits.argmax(dim=1))


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """CE for class indices [B]; soft-target CE for mixup/cutmix targets [B, C]."""
    if targets.dim() == 2:
        return SoftTargetCrossEntropy()(logits, targets)
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


def split_heads(output: StudentOutput) -> tuple[torch.Tensor, torch.Tensor]:
    """(class-head logits, logits the KD term goes on); the same tensor for a student without a distill token."""
    if isinstance(output, (tuple, list)):
        cls_logits, dist_logits = output
        return cls_logits, dist_logits
    return output, output


def merged_logits(output: StudentOutput) -> torch.Tensor:
    """Prediction logits: the two heads averaged for a distilled student, as timm does in eval."""
    if isinstance(output, (tuple, list)):
        return (output[0] + output[1]) / 2
    return output


@dataclass
class LossParts:
    total: torch.Tensor  # what backward runs on
    ce: torch.Tensor  # detached
    kd: torch.Tensor  # detached; 0 without a teacher
    feature: torch.Tensor | None = None  # detached; the Manifold/Attention term (`--kd manifold|attention`)


class DistillationLoss(nn.Module):
    """CE + lambda * KD; with `teacher_logits=None` (mode none) just CE on the merged heads."""

    def __init__(self, lambda_kd: float = 1.0, tau: float = 1.0, hard: bool = False, label_smoothing: float = 0.0):
        super().__init__()
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.lambda_kd = lambda_kd
        self.tau = tau
        self.hard = hard
        self.label_smoothing = label_smoothing

    def forward(
        self, output: StudentOutput, targets: torch.Tensor, teacher_logits: torch.Tensor | None = None
    ) -> LossParts:
        if teacher_logits is None:
            ce = classification_loss(merged_logits(output), targets, self.label_smoothing)
            return LossParts(ce, ce.detach(), torch.zeros((), device=ce.device))
        cls_logits, kd_logits = split_heads(output)
        ce = classification_loss(cls_logits, targets, self.label_smoothing)
        teacher_logits = teacher_logits.to(kd_logits.device)
        if self.hard:
            kd = hard_kd_loss(kd_logits, teacher_logits)
        else:
            kd = kd_kl_loss(kd_logits, teacher_logits, self.tau)
        return LossParts(ce + self.lambda_kd * kd, ce.detach(), kd.detach())
