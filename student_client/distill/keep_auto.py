"""`--keep auto`: pick the smallest teacher input that keeps the supervision faithful, from probes.

A probe sends a few of a step's images to the teacher twice over: the full image, and every rung of a ladder of keeps
(each strategy x each fraction). Fidelity of a rung = KL(full || masked) of the teacher's softened outputs (the
quantity the KD loss sees) and the top-1 agreement with the full answer. The decision is the smallest keep whose mean
KL and agreement meet the target; none: the full image (strategy `all`, keep 1.0). The keep decided last is kept
while it stays near the target (hysteresis), so probe noise does not flip the decision back and forth.

Everything here is a pure function on tensors. Per-rung sums (not means) travel, so workers all-reduce them and every
rank derives the same decision from the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LADDER = (0.75, 0.5, 0.375, 0.25)  # fractions of the teacher's patches tried, largest first
FULL = ("all", 1.0)  # the decision when no rung meets the target
# defaults of TrainConfig's --keep-* flags and MaskedKD's keep_* arguments
# 64 probe images per worker: the mean of a few images is noisy. Random-50 on CIFAR-10 (mean KL 0.10 nats over 640
# test images), 10th-90th percentile of the mean over n images: n=4 0.03-0.19, n=16 0.07-0.13, n=32 0.08-0.12; top-1
# agreement near 84% has a standard error of 4.5 points at n=64. Cost: 64 x (1 + 2 x 1.875) = 304 full-image answers
# per worker per decision, 2.4% of 200 steps of 64 full images.
# Thresholds, from what each keep did to the students of the reproductions (docs/reproduction.md; probes of
# `python -m experiments.fidelity_probe`, trained students): harmless were CIFAR-10 random-50 (KL 0.11, agreement
# 84%) and MNIST random-50 (0.21, 91%) and SIPS-50 (0.03-0.13, 94-98%); CIFAR-10 SIPS-50 (0.29-0.33, 69-71%) cost
# the student 2 points. 0.15 nats passes the first and rejects the last with room for probe noise; the agreement
# floor only rejects answers that flip the teacher's class often (CIFAR-10 random-37.5: 0.19, 78%).
EVERY, PROBES, MAX_KL, MIN_AGREEMENT = 200, 64, 0.15, 0.75
# Hysteresis: the keep chosen last is kept while its KL stays within STAY_KL_FACTOR x the target and its agreement
# within STAY_AGREEMENT_SLACK of the floor; only a clear miss moves to a larger keep. Without it a rung sitting at the
# target flips on probe noise: CIFAR-10 random-50 (KL 0.13-0.14 on 2,000 images; 64 probes give a standard error of
# about 0.015) went 50% -> 75% -> 50% within one run and cost 0.60-0.67 x full KD instead of 0.51 x.
STAY_KL_FACTOR, STAY_AGREEMENT_SLACK = 1.2, 0.05


@dataclass(frozen=True)
class KeepAutoSettings:
    """When and against what target `--keep auto` decides (TrainConfig's --keep-* flags, MaskedKD's keep_*)."""

    every: int = EVERY  # probe and decide again every N steps
    probes: int = PROBES  # images per worker sent as probes at a decision
    max_kl: float = MAX_KL  # largest mean KL(full || masked) of the teacher's softened outputs
    min_agreement: float = MIN_AGREEMENT  # smallest top-1 agreement with the full image


@dataclass(frozen=True)
class Rung:
    strategy: str  # sips | random
    keep: float  # fraction of the teacher's patches

    @property
    def name(self) -> str:
        """Request-id suffix and log name, e.g. `sips-0.375`."""
        return f"{self.strategy}-{self.keep:g}"


@dataclass(frozen=True)
class Decision:
    strategy: str
    keep: float
    kl: float  # mean KL(full || masked) of the chosen rung (0 for the full image)
    agreement: float  # its top-1 agreement with the full image (1 for the full image)


def ladder(strategies: Sequence[str], keeps: Sequence[float] = LADDER) -> list[Rung]:
    """Every (strategy, keep) pair, strategy-major."""
    return [Rung(s, float(k)) for s in strategies for k in keeps]


def rung_sums(full: torch.Tensor, masked: Sequence[torch.Tensor], tau: float) -> torch.Tensor:
    """full [P, C] and one [P, C] per rung -> [R, 3] float64: (sum of KL(full || rung), sum of top-1 agreements, P)."""
    log_p = F.log_softmax(full.double() / tau, dim=-1)  # [P, C]
    top1 = full.argmax(dim=-1)  # [P]
    rows = []
    for m in masked:
        log_q = F.log_softmax(m.double() / tau, dim=-1)  # [P, C]
        kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)  # [P]
        agree = (m.argmax(dim=-1) == top1).double()  # [P]
        rows.append(torch.stack([kl.sum(), agree.sum(), torch.tensor(float(full.shape[0]), dtype=torch.float64)]))
    return torch.stack(rows) if rows else torch.zeros(0, 3, dtype=torch.float64)


def choose(
    rungs: Sequence[Rung], sums: torch.Tensor, *, max_kl: float, min_agreement: float, current: Rung | None = None
) -> Decision:
    """The smallest keep whose mean KL <= max_kl and agreement >= min_agreement (ties: the lower KL); else FULL.

    `current` (the rung decided last, if any) stays chosen over a larger keep while it is within the hysteresis band
    (STAY_KL_FACTOR, STAY_AGREEMENT_SLACK); a smaller keep that meets the plain target still replaces it."""
    best: Decision | None = None
    measured: dict[Rung, Decision] = {}
    for rung, (kl_sum, agree_sum, n) in zip(rungs, sums.tolist(), strict=True):
        if n <= 0:
            continue
        kl, agreement = kl_sum / n, agree_sum / n
        measured[rung] = Decision(rung.strategy, rung.keep, kl, agreement)
        if kl > max_kl or agreement < min_agreement:
            continue
        if best is None or (rung.keep, kl) < (best.keep, best.kl):
            best = measured[rung]
    decision = best or Decision(FULL[0], FULL[1], 0.0, 1.0)
    stay = measured.get(current) if current is not None else None
    if (
        stay is not None
        and stay.keep < decision.keep
        and stay.kl <= max_kl * STAY_KL_FACTOR
        and stay.agreement >= min_agreement - STAY_AGREEMENT_SLACK
    ):
        return stay
    return decision
