"""The probes of `--keep auto` (see keep_auto): a step's first few images to the teacher as the full image and every
rung of the ladder, under deterministic ids `<prefix>-s<step>-probe-full` / `-probe-<strategy>-<keep>`, so a resume or
a rerun of the step replays them from the teacher's ledger instead of paying again. They carry purpose "probe", so the
teacher's usage reports and dashboard show what they cost beside the training targets.

The full-image answer becomes the KD target of the probe images in that step (`StepRunner(..., known=...)`), so the
probes' images need no other request.
"""

from __future__ import annotations

from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from maskedkd.purpose import PROBE
from student_client.collective import Collective, first_error
from student_client.data import Normalizer
from student_client.distill.keep_auto import Rung, choose, ladder, rung_sums
from student_client.distill.pipeline import Submit
from student_client.distill.sips import select_patches
from student_client.distill.train_step import PatchSelector
from student_client.errors import FATAL_ERRORS, TeacherError, TeacherUnavailableError
from student_client.transport.wire import Usage


@dataclass
class ProbeOutcome:
    sums: torch.Tensor  # [R, 3] keep_auto.rung_sums of this worker's probes
    full_logits: torch.Tensor  # [P, classes] the teacher on the full probe images: their KD target this step
    usage: Usage  # what the probes cost (full + every rung)


class KeepProber:
    """Probes one worker's images; the caller all-reduces `sums` and runs keep_auto.choose on them."""

    def __init__(
        self,
        *,
        raw_model: nn.Module,
        normalize: Normalizer,
        selector: PatchSelector,
        submit: Submit,
        probes: int,
        tau: float,
        timeout_s: float,
    ) -> None:
        self.raw_model = raw_model
        self.normalize = normalize
        self.selector = selector
        self.submit = submit
        self.probes = probes
        self.tau = tau
        self.timeout_s = timeout_s
        strategies = ("sips", "random") if selector.capture is not None else ("random",)
        self.rungs: list[Rung] = ladder(strategies)

    def probe(self, images: torch.Tensor, *, step: int, prefix: str) -> ProbeOutcome:
        """images [P, C, H, W] in [0, 1] (what the student sees this step)."""
        sel, tg = self.selector, self.selector.target_grid
        if sel.capture is not None:  # the student's own SIPS on the probe images, as a kd step ranks them
            with torch.no_grad():
                self.raw_model(self.normalize(images))
            scores, grid = sel.capture.scores, sel.student_grid
        else:
            grid = sel.target_grid
            scores = torch.zeros(images.shape[0], grid[0] * grid[1], device=images.device)
        assert scores is not None
        pixels = images.detach()
        futures = [
            self.submit(images=pixels, keep_indices=None, request_id=f"{prefix}-s{step}-probe-full", purpose=PROBE)
        ]
        for rung in self.rungs:
            if rung.strategy == "sips":
                score_map, score_grid = scores, grid
            else:  # random needs no scores, only the teacher grid's shape
                score_map, score_grid = torch.zeros(images.shape[0], tg[0] * tg[1], device=images.device), tg
            keep = select_patches(
                score_map, rung.keep, rung.strategy, teacher_grid=tg, student_grid=score_grid, generator=sel.generator
            )
            futures.append(
                self.submit(
                    images=pixels, keep_indices=keep, request_id=f"{prefix}-s{step}-probe-{rung.name}", purpose=PROBE
                )
            )
        try:
            answers = [f.result(timeout=self.timeout_s) for f in futures]
        except FutureTimeout:
            raise TeacherUnavailableError(f"no teacher answer to a probe within {self.timeout_s:.0f}s") from None
        usage = Usage()
        for _, u in answers:
            usage = usage + u
        full = answers[0][0].float()
        return ProbeOutcome(rung_sums(full, [lg for lg, _ in answers[1:]], self.tau), full, usage)


@dataclass
class KeepDecision:
    known: torch.Tensor | None  # [P, classes] full-image logits of this worker's probe images (their KD target)
    usage: Usage  # this worker's probe cost
    record: dict[str, Any]  # the decision, summed over workers: step, strategy, keep, kl, agreement, probe cost
    error: str | None = None  # a fatal teacher error on any worker (then nothing else is set)
    raised: TeacherError | None = None  # this worker's own, to re-raise where there is no fatal-error protocol


def probe_and_decide(
    prober: KeepProber,
    ctx: Collective,
    images: torch.Tensor,
    *,
    step: int,
    prefix: str,
    max_kl: float,
    min_agreement: float,
) -> KeepDecision:
    """Probe this worker's first images, all-reduce every worker's sums, decide, and set the selector to it.
    The selector holds the previous decision, which the decision's hysteresis keeps near (before the first one it
    holds the full image, keep 1.0: no rung of the ladder, so nothing is held).

    A collective: every worker calls it at the same step and gets the same decision (or the same error)."""
    outcome, error, raised = None, None, None
    try:
        outcome = prober.probe(images[: prober.probes], step=step, prefix=prefix)
    except FATAL_ERRORS as err:
        error, raised = str(err), err
    r = len(prober.rungs)
    local = torch.zeros(3 * r + 3, dtype=torch.float64)  # rung sums, probe GFLOPs, probe cost, error flag
    if outcome is not None:
        local[: 3 * r] = outcome.sums.flatten()
        local[3 * r : 3 * r + 2] = torch.tensor([outcome.usage.gflops, outcome.usage.cost], dtype=torch.float64)
    else:
        local[-1] = 1.0
    total = ctx.all_reduce(local)
    if float(total[-1]) > 0:
        message = first_error(ctx, error, "fatal teacher error in a probe")
        return KeepDecision(None, Usage(), {}, message, raised)
    assert outcome is not None
    decision = choose(
        prober.rungs,
        total[: 3 * r].view(r, 3),
        max_kl=max_kl,
        min_agreement=min_agreement,
        current=Rung(prober.selector.strategy, float(prober.selector.keep)),
    )
    prober.selector.strategy, prober.selector.keep = decision.strategy, decision.keep
    record = {
        "step": step,
        "strategy": decision.strategy,
        "keep": decision.keep,
        "kl": decision.kl,
        "agreement": decision.agreement,
        "probe_gflops": float(total[3 * r]),
        "probe_cost": float(total[3 * r + 1]),
    }
    return KeepDecision(outcome.full_logits, outcome.usage, record)


def apply_decision(selector: PatchSelector, record: dict[str, Any]) -> None:
    """Set the selector to a stored decision (a resumed run continues with the keep it had chosen)."""
    selector.strategy, selector.keep = str(record["strategy"]), float(record["keep"])


def decision_line(record: dict[str, Any]) -> str:
    """The stderr line of one decision."""
    return (
        f"keep auto @ step {record['step']}: {record['strategy']} {record['keep']:g} "
        f"(KL {record['kl']:.4f}, top-1 agreement {record['agreement']:.2f}; "
        f"probes {record['probe_gflops']:.3f} GFLOPs, cost {record['probe_cost']:.6g})"
    )
