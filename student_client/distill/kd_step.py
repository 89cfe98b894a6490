"""The parts of one distillation step, built by the one function that both `student-client train` (train_run) and
`MaskedKD` (kd) call: the SIPS capture on the student, the patch selector, the step runner (train_step), and for
`--keep auto` the prober (keep_probe); per step, the selection's seed and the keep decision when one is due."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from student_client.collective import Collective
from student_client.data import Normalizer
from student_client.distill.feature_step import FeatureDistiller
from student_client.distill.keep_auto import KeepAutoSettings
from student_client.distill.keep_probe import KeepDecision, KeepProber, probe_and_decide
from student_client.distill.losses import DistillationLoss
from student_client.distill.pipeline import Submit
from student_client.distill.sips import SIPSCapture
from student_client.distill.train_step import PatchSelector, StepRunner, StepSettings
from student_client.student import StudentSpec


@dataclass
class KDStepParts:
    """What runs one step; without a teacher (mode none) the runner alone."""

    runner: StepRunner
    selector: PatchSelector | None = None  # the kept patches of each request
    capture: SIPSCapture | None = None  # SIPS of every student forward, when a strategy (or a probe) ranks by it
    prober: KeepProber | None = None  # keep auto
    keep_auto: KeepAutoSettings | None = None
    distiller: FeatureDistiller | None = None  # --kd manifold|attention

    def seed_selection(self, seed: int) -> None:
        """Reseed the random strategy's draws and the manifold's sampling (every step, from the step's own seed)."""
        if self.selector is not None:
            self.selector.generator.manual_seed(seed)
        if self.distiller is not None:
            self.distiller.generator.manual_seed(seed)

    def decide_keep_if_due(
        self, ctx: Collective, images: torch.Tensor, *, step: int, prefix: str, decided_before: bool
    ) -> KeepDecision | None:
        """keep auto, every `keep_auto.every` steps and at the first step without a decision yet: probe `images`,
        agree over the workers, set the selector (keep_probe.probe_and_decide). None when no decision is due.
        A collective: every worker calls it at every step."""
        if self.prober is None or self.keep_auto is None or (step % self.keep_auto.every and decided_before):
            return None
        return probe_and_decide(
            self.prober,
            ctx,
            images,
            step=step,
            prefix=prefix,
            max_kl=self.keep_auto.max_kl,
            min_agreement=self.keep_auto.min_agreement,
        )

    def close(self) -> None:
        """Remove the SIPS and feature hooks from the student."""
        if self.capture is not None:
            self.capture.remove()
        if self.distiller is not None:
            self.distiller.close()


def build_kd_step(
    settings: StepSettings,
    *,
    model: nn.Module,
    raw_model: nn.Module,
    spec: StudentSpec,
    normalize: Normalizer,
    criterion: DistillationLoss,
    submit: Submit | None,
    teacher_grid: tuple[int, int] | None,
    request_id_prefix: str,
    precision: str | None = None,
    keep_auto: KeepAutoSettings | None = None,
) -> KDStepParts:
    """The parts of a step of `settings.mode` for the timm student `raw_model` (`model`: what the training forward
    goes through, e.g. DDP). `submit` None: no teacher (mode none). `keep_auto`: the keep is decided on probes, from
    the full image (settings.keep_value 1.0) until the first decision. `precision`: the run's (else from settings)."""
    selector: PatchSelector | None = None
    capture: SIPSCapture | None = None
    if submit is not None:
        assert teacher_grid is not None, "a step with a teacher needs the teacher's patch grid"
        ranks_by_sips = settings.strategy in ("sips", "bottom") and keep_auto is None
        probes_sips = keep_auto is not None and spec.grid_size is not None  # keep auto tries sips on a ViT student
        capture = SIPSCapture(raw_model) if ranks_by_sips or probes_sips else None
        # kd masks the teacher's input (its grid); mask-student the student's (the teacher sees the full image)
        target_grid = teacher_grid if settings.mode == "kd" else (spec.grid_size or teacher_grid)
        selector = PatchSelector(settings, capture, spec.grid_size, target_grid, torch.Generator())
    distiller, step_submit = None, submit
    if submit is not None and settings.mode == "kd" and settings.kd != "logit":
        assert teacher_grid is not None
        distiller = FeatureDistiller(
            settings.kd, settings.feature_weight, raw_model, student_grid=spec.grid_size, teacher_grid=teacher_grid
        )
        step_submit = distiller.checked(submit)  # the features checked as they arrive, off the training thread
    runner = StepRunner(
        settings,
        model,
        raw_model,
        normalize,
        criterion,
        selector,
        step_submit,
        request_id_prefix=request_id_prefix,
        precision=precision,
        distiller=distiller,
    )
    if submit is None or selector is None:  # no teacher (mode none): the runner alone
        return KDStepParts(runner)
    prober = (
        None
        if keep_auto is None
        else KeepProber(
            raw_model=raw_model,
            normalize=normalize,
            selector=selector,
            submit=submit,
            probes=keep_auto.probes,
            tau=criterion.tau,
            timeout_s=settings.teacher_wait_s,
        )
    )
    return KDStepParts(runner, selector, capture, prober, keep_auto, distiller)
