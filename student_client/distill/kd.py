"""MaskedKD in one's own training loop: `loss = kd(images, labels); loss.backward()`.

>>> kd = MaskedKD(student, TeacherClient("teacher:50051", api_key), keep=0.5)
>>> for step, (images, labels) in enumerate(loader):      # images un-normalized: float in [0, 1] or uint8
...     loss = kd(images, labels, step=step)                # CE + lambda * tau^2 * KL(teacher || student)
...     optimizer.zero_grad(); loss.backward(); optimizer.step()
...     print(kd.last.ce, kd.last.kd, kd.last.billed.gflops, kd.total_billed.cost)

One call runs the same step as `student-client train --mode kd` (`train_step.StepRunner`): the student forward on
the full image (SIPS captured by a hook on its last block), the kept patches picked on the teacher's grid, only those
patches sent (uint8 when the pixels are exactly k/255), and the loss from the teacher's logits.

Everything that can be wrong with the pairing (the API key, classes, channels, geometry, SIPS support, keep, strategy)
is checked once, at construction, against the teacher's `GetModelInfo`; a call trusts it.

Pipelining (paper App. E): with `micro_batches=M` (default 2) the batch is cut into M parts; the teacher request of
part i goes out as soon as the student's forward of part i is done, and runs while the student computes parts
i+1..M-1; the answers are gathered after the last forward and one loss covers the whole batch (one backward).
`kd.last.overlap` is the fraction of the teacher's time hidden that way; `micro_batches=1` sends one request per call.

Request ids are `<run_id>-s<step>-m<part>`: pass `run_id` and `step` (or keep `kd.step`, which counts successful
calls, in your checkpoint) and a retried or resumed step re-sends the same ids, which the teacher answers from its
ledger without billing again (`kd.last.usage.replayed`). Without `run_id` a random one is drawn per MaskedKD. Under
DDP give every rank its own run_id (e.g. f"{run}-w{rank}"): ids are per API key, and one id with other content is
re-sent under `<id>.rN` and billed again (`kd.mismatched_requests`). A resumed loop whose kept patches may come out
different (another precision, CPU or thread count flipped a near-tie) can build its client with
`TeacherClient(..., reuse_billed_answers=True)`: a re-sent id of the same batch size then takes the answer billed
under it, unbilled (student_client/transport/resend.py; `student-client train` does this).

Build it after the student is on its device (the normalization constants are put there once); in Lightning, in
`on_fit_start` (examples/lightning_loop.py).
"""

from __future__ import annotations

import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from maskedkd.keep import num_keep
from student_client.collective import TorchDistCollective
from student_client.data import Normalizer, unit_pixels
from student_client.determinism import step_seed
from student_client.distill import keep_auto
from student_client.distill.feature_step import KD_KINDS, check_teacher_outputs
from student_client.distill.kd_step import build_kd_step
from student_client.distill.losses import DistillationLoss, LossParts
from student_client.distill.pipeline import OverlapStats
from student_client.distill.sips import STRATEGIES, _unwrap
from student_client.errors import TeacherInputError
from student_client.student import describe_student
from student_client.transport.client import InferResult, TeacherClient
from student_client.transport.stream import TeacherStreams
from student_client.transport.wire import ModelInfo, Usage

PRECISIONS = ("fp32", "bf16", "auto")
TRANSPORTS = ("unary", "stream")


@dataclass(frozen=True)
class KDSettings:
    """The step settings StepRunner reads (`train_step.StepSettings`), fixed at construction."""

    strategy: str
    keep_value: float | int
    micro_batches: int
    precision: str
    teacher_wait_s: float
    mode: str = "kd"
    keep_mass: float | None = None  # per-image K (TrainConfig.keep_mass); the library keeps a fixed K
    kd: str = "logit"  # logit | manifold | attention (feature_step.py)
    feature_weight: float = 1.0  # weight of the manifold/attention term


@dataclass
class KDStep:
    """What one call did: its loss parts and what the teacher answered and billed.

    The loss parts stay tensors on the student's device until read (`kd.last.loss`, ...): a read is a host sync on a
    GPU, so reading them after `loss.backward()` lets the backward be queued behind the forward without waiting."""

    step: int = -1  # the step number its request ids carry
    parts: LossParts | None = None  # detached; None before the first call
    usage: Usage = field(default_factory=Usage)  # every answer, replayed ones included
    billed: Usage = field(default_factory=Usage)  # the answers billed now (replays excluded): what it cost
    overlap: float = 1.0  # fraction of the teacher's wall time hidden behind the student
    stats: OverlapStats = field(default_factory=OverlapStats)

    @property
    def loss(self) -> float:
        """CE + lambda * KD (+ the feature term)."""
        return float("nan") if self.parts is None else float(self.parts.total)

    @property
    def ce(self) -> float:
        return float("nan") if self.parts is None else float(self.parts.ce)

    @property
    def kd(self) -> float:
        """tau^2 * KL (or the hard-label CE with hard=True)."""
        return float("nan") if self.parts is None else float(self.parts.kd)

    @property
    def feature(self) -> float:
        """The Manifold/Attention term (kd="manifold"|"attention"), weighted; NaN without one."""
        return float("nan") if self.parts is None or self.parts.feature is None else float(self.parts.feature)


class MaskedKD:
    """Callable MaskedKD loss for a timm ViT student against a metered teacher (see the module docstring).

    student: a timm ViT (optionally inside DDP or torch.compile), on the device the images are on; its training
    forward must return logits (DeiT distilled students are switched to (cls, dist) outputs: KD on the dist head).
    teacher: a TeacherClient (MaskedKD neither owns nor closes it). keep: fraction in (0, 1] or int count of the
    teacher's patches, or "auto": every `keep_every` steps the first `keep_probes` images go to the teacher whole
    and at 75/50/37.5/25% (sips and random), and the smallest keep meeting `keep_max_kl` / `keep_min_agreement` is
    used until the next decision (`keep_auto`; the probes are billed, in `last.usage`, and the full-image answers
    are their images' KD targets; `kd.keep_decisions` lists the decisions). strategy: sips | random | bottom | all.
    lambda_kd, tau, hard, label_smoothing: the loss (`losses.DistillationLoss`). micro_batches: pipelining (module
    docstring). transport: unary calls on the client's threads, or one InferStream. run_id, seed: request ids and the
    random strategy's draws per step. mean/std: the student's input normalization (default: its timm pretrained config).
    precision: the student forward's autocast (fp32: none; bf16; auto: bf16 where native). allow_resize: a student whose
    image size or patch grid differs from the teacher's (images resized bilinearly, scores interpolated, paper App. B).
    kd: "logit", or also distil the teacher's kept patches' final tokens ("manifold": Manifold distillation) or every
    block's class attention over them ("attention"), weighted by `feature_weight` (feature_step.py; `last.feature`);
    the teacher answers them at no extra FLOPs. lambda_kd=0 distils the features alone.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: TeacherClient,
        *,
        keep: float | int | str = 0.5,
        strategy: str = "sips",
        lambda_kd: float = 1.0,
        tau: float = 1.0,
        hard: bool = False,
        label_smoothing: float = 0.0,
        micro_batches: int = 2,
        transport: str = "unary",
        run_id: str | None = None,
        seed: int = 0,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        precision: str = "fp32",
        allow_resize: bool = True,
        keep_every: int = keep_auto.EVERY,
        keep_probes: int = keep_auto.PROBES,
        keep_max_kl: float = keep_auto.MAX_KL,
        keep_min_agreement: float = keep_auto.MIN_AGREEMENT,
        kd: str = "logit",
        feature_weight: float = 1.0,
    ) -> None:
        _check_choice("strategy", strategy, STRATEGIES)
        _check_choice("kd", kd, KD_KINDS)
        _check_choice("transport", transport, TRANSPORTS)
        _check_choice("precision", precision, PRECISIONS)
        if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
            raise ValueError(f"micro_batches must be an int >= 1, got {micro_batches!r}")
        if not lambda_kd >= 0:
            raise ValueError(f"lambda_kd must be >= 0, got {lambda_kd!r}")
        raw = _unwrap(student)  # the timm model inside DDP / torch.compile
        spec = describe_student(raw)
        self.info: ModelInfo = teacher.info()  # one GetModelInfo: an unreachable teacher fails here
        teacher.check_key()  # TeacherAuthError for a bad or disabled key (free: nothing runs, nothing is billed)
        _check_pairing(raw, spec.image_size, spec.grid_size, self.info, strategy, allow_resize)
        check_teacher_outputs(kd, self.info.outputs, self.info.model)
        auto = keep == "auto"
        if not auto:
            num_keep(keep, self.info.num_patches)  # type: ignore[arg-type]  # ValueError naming the range
        elif keep_every < 1 or keep_probes < 1:
            raise ValueError(f"keep_every and keep_probes must be >= 1, got {keep_every}, {keep_probes}")
        if spec.distilled:
            raw.set_distilled_training(True)  # type: ignore[operator]  # timm's distilled models have it (checked above)

        self.student = student
        self.client = teacher
        self.settings = KDSettings(
            strategy=strategy,
            keep_value=1.0 if auto else keep,  # type: ignore[arg-type]  # auto resolves to a float keep here
            micro_batches=micro_batches,
            precision=precision,
            teacher_wait_s=_teacher_wait_s(teacher),
            kd=kd,
            feature_weight=feature_weight,
        )
        self.run_id = run_id or uuid.uuid4().hex[:16]
        self.seed = seed
        self.step = 0  # the next call's step when none is passed
        self.last = KDStep()
        self.total_usage = Usage()  # every answer since construction (replays included)
        self.total_billed = Usage()  # what the teacher billed since construction: equals the ledger
        self._stream: TeacherStreams | None = None
        self._futures: list[Future[InferResult]] = []
        self.criterion = DistillationLoss(lambda_kd, tau, hard, label_smoothing)
        normalize = Normalizer(mean or spec.mean, std or spec.std, next(raw.parameters()).device)
        auto_settings = (
            keep_auto.KeepAutoSettings(
                every=keep_every, probes=keep_probes, max_kl=keep_max_kl, min_agreement=keep_min_agreement
            )
            if auto
            else None
        )
        # the step `student-client train --mode kd` runs (kd_step); SIPSUnsupportedModelError names what works
        self._step = build_kd_step(
            self.settings,
            model=student,
            raw_model=raw,
            spec=spec,
            normalize=normalize,
            criterion=self.criterion,
            submit=self._submit,
            teacher_grid=self.info.grid_size,
            request_id_prefix=self.run_id,
            keep_auto=auto_settings,
        )
        self._stream = TeacherStreams(teacher) if transport == "stream" else None
        self.keep_decisions: list[dict[str, Any]] = []  # keep="auto": one record per decision (keep_probe)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, *, step: int | None = None) -> torch.Tensor:
        """images [B, C, H, W] un-normalized (float in [0, 1] or uint8) on the student's device; labels [B] class
        indices or [B, classes] soft targets -> the scalar loss to backward. `step` (default `self.step`) names the
        request ids; the same step with the same inputs is answered from the teacher's ledger, unbilled."""
        x = unit_pixels(images)  # [B, C, H, W] in [0, 1]
        step = self.step if step is None else step
        self._step.seed_selection(step_seed(self.seed, 0, step, 0, "select"))
        self._futures = []
        known, probe_usage = None, Usage()
        # keep="auto": agreed over the torch.distributed ranks when a process group is initialized
        decided = self._step.decide_keep_if_due(
            TorchDistCollective(), x, step=step, prefix=self.run_id, decided_before=bool(self.keep_decisions)
        )
        if decided is not None:
            if decided.error is not None:
                raise decided.raised or TeacherInputError(decided.error)
            known, probe_usage = decided.known, decided.usage
            self.keep_decisions.append(decided.record)
        result = self._step.runner(x, labels, step, known=known)
        answers = [fut.result()[1] for fut in self._futures]  # all done: the runner gathered every one
        billed = sum((u for u in answers if not u.replayed), Usage())
        self.last = KDStep(
            step=step,
            parts=replace(result.loss, total=result.loss.total.detach()),
            usage=result.usage + probe_usage,
            billed=billed,
            overlap=result.stats.overlap,
            stats=result.stats,
        )
        self.total_usage = self.total_usage + result.usage + probe_usage
        self.total_billed = self.total_billed + billed
        self.step = step + 1
        return result.loss.total

    @property
    def mismatched_requests(self) -> int:
        """Requests whose id the teacher had billed for other inputs, re-sent (and billed) under `<id>.rN`."""
        return self.client.mismatched_requests

    def _submit(self, **kwargs: Any) -> Future[InferResult]:
        fut = self._stream.submit(**kwargs) if self._stream is not None else self.client.submit(**kwargs)
        self._futures.append(fut)
        return fut

    def close(self) -> None:
        """Remove the SIPS hook and close the stream (the TeacherClient stays open: it is the caller's)."""
        self._step.close()
        if self._stream is not None:
            self._stream.close(timeout_s=5.0)
            self._stream = None

    def __enter__(self) -> MaskedKD:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _teacher_wait_s(client: TeacherClient) -> float:
    """How long a call waits for one answer: every attempt's deadline plus the client's patience."""
    return client.timeout_s * (client.max_retries + 1) + client.patience_s


def _check_pairing(
    raw: nn.Module,
    image_size: tuple[int, int],
    grid: tuple[int, int] | None,
    info: ModelInfo,
    strategy: str,
    allow_resize: bool,
) -> None:
    """The student against the teacher's GetModelInfo; one ValueError per mismatch."""
    classes = getattr(raw, "num_classes", None)
    if classes != info.num_classes:
        raise ValueError(f"the teacher {info.model} predicts {info.num_classes} classes, the student {classes}")
    proj = getattr(getattr(raw, "patch_embed", None), "proj", None)
    chans = getattr(proj, "in_channels", None)
    if chans is not None and chans != info.in_chans:
        raise ValueError(f"the teacher {info.model} takes {info.in_chans} channels, the student {chans}")
    if grid is None and strategy in ("sips", "bottom"):
        raise ValueError(
            f"strategy {strategy!r} needs a ViT student with a patch grid; {type(raw).__name__} has "
            "none (use strategy 'random' or 'all')"
        )
    if not allow_resize and (tuple(image_size) != tuple(info.image_size) or grid != tuple(info.grid_size)):
        raise ValueError(
            f"the student takes {image_size[0]}x{image_size[1]} images on a {grid} patch grid, the "
            f"teacher {info.model} {info.image_size[0]}x{info.image_size[1]} on {info.grid_size} "
            f"(patch size {info.patch_size}); pass allow_resize=True to resize (paper App. B)"
        )
