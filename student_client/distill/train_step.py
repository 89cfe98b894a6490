"""One optimizer step of MaskedKD on one worker (paper Eq. 1 with SIPS, pipelined as in App. E).

kd:            student forward per micro-batch (SIPS captured), select patches on the teacher's grid, send the kept
               patches asynchronously; gather the teacher logits; CE + lambda * KD; one backward. With strategy random
               or all the selection needs no student, so every micro-batch's request goes out before the first forward.
none:          plain supervised CE (no teacher).
mask-student:  the Sec 4.2 ablation: the teacher sees the full image, the student only its kept patches.

Precision (`--precision`): the student's forwards run under bf16 autocast when the resolved precision is bf16
(`maskedkd.precision.resolve_precision`: auto means bf16 only where the device computes it natively). SIPS
ranks in fp32 (sips.py leaves autocast for its softmax), and the loss is computed outside autocast on fp32 logits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from maskedkd.precision import resolve_precision
from student_client.data import Normalizer
from student_client.distill.feature_step import FeatureDistiller
from student_client.distill.losses import DistillationLoss, LossParts
from student_client.distill.pipeline import OverlapStats, Submit, TeacherRequest, pipelined_forward
from student_client.distill.sips import SIPSCapture, select_by_mass, select_patches
from student_client.transport.off_thread import to_device
from student_client.transport.wire import Usage


@dataclass
class StepResult:
    loss: LossParts
    images: int
    usage: Usage = field(default_factory=Usage)
    stats: OverlapStats = field(default_factory=OverlapStats)
    kept: float = 0.0  # sum over the images of the share of the teacher's patches each was answered from


def concat_outputs(outputs: list[Any]) -> Any:
    """Per-micro-batch student outputs -> one float32 batch (tuples of heads concatenated head by head)."""
    if isinstance(outputs[0], (tuple, list)):
        return tuple(torch.cat(parts).float() for parts in zip(*outputs, strict=True))
    return torch.cat(outputs).float()


def as_float32(output: Any) -> Any:
    """A student output (a tensor or a tuple of heads) in float32, for the loss."""
    if isinstance(output, (tuple, list)):
        return tuple(t.float() for t in output)
    return output.float()


def student_autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The context the student's forward runs in: bf16 autocast for "bf16", nothing for "fp32"."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def unfused_attention_modules(model: nn.Module, precision: str, device: torch.device) -> list[nn.Module]:
    """The student's attention modules to run unfused during its training forwards: every module with timm's
    `fused_attn` switch when training in bf16 on a CPU, else none.

    Why: torch's CPU flash-attention backward is slow in bf16. On a 2-core AMX Xeon (torch 2.15) it took 9.0 ms a
    call against 1.5 in fp32 at ViT-Ti/4's 65 tokens, so a bf16 step was barely faster than an fp32 one (ViT-Ti/4,
    32 px, batch 64: 677 against 731 ms); with the explicit q @ k^T, softmax, @ v it took 348 ms (DeiT-Ti 224 px,
    batch 32: 749 -> 510 ms). The gradients' error against fp32 is the same either way (1.0%). A GPU keeps the fused
    kernel, and so does an fp32 CPU run (fused is the faster there)."""
    if precision != "bf16" or device.type != "cpu":
        return []
    return attention_modules(model)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Every module of `model` with timm's `fused_attn` switch (its attention layers)."""
    return [m for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]


@contextlib.contextmanager
def attention_unfused(modules: list[nn.Module]) -> Iterator[None]:
    """Inside: each of `modules` computes its attention explicitly (timm's `fused_attn = False`), which also decides
    the backward of the graph recorded here. Each module's own setting comes back on exit."""
    before = [bool(m.fused_attn) for m in modules]
    for m in modules:
        setattr(m, "fused_attn", False)  # noqa: B010 - nn.Module's typed __setattr__ takes no bool
    try:
        yield
    finally:
        for m, fused in zip(modules, before, strict=True):
            setattr(m, "fused_attn", fused)  # noqa: B010


class StepSettings(Protocol):
    """What a step reads from its config: a TrainConfig, or `student_client.distill.kd.KDSettings` for MaskedKD."""

    @property
    def mode(self) -> str: ...  # kd | none | mask-student

    @property
    def strategy(self) -> str: ...  # sips | random | bottom | all

    @property
    def micro_batches(self) -> int: ...  # App. E pipelining: teacher on micro-batch i while the student on i+1

    @property
    def precision(self) -> str: ...  # auto | bf16 | fp32 (student forward autocast)

    @property
    def keep_mass(self) -> float | None: ...  # per-image K: each image's fewest top-SIPS patches holding this share

    @property
    def keep_value(self) -> float | int: ...  # what select_patches takes: a fraction or an int count

    @property
    def teacher_wait_s(self) -> float: ...  # longest wait for one teacher answer

    @property
    def kd(self) -> str: ...  # logit | manifold | attention: what is distilled besides the logits

    @property
    def feature_weight(self) -> float: ...  # weight of the manifold/attention term


class PatchSelector:
    """Kept positions for one micro-batch: SIPS (top/bottom-k), random, or all, mapped to the target grid."""

    def __init__(
        self,
        cfg: StepSettings,
        capture: SIPSCapture | None,
        student_grid: tuple[int, int] | None,
        target_grid: tuple[int, int],
        generator: torch.Generator,
    ) -> None:
        self.cfg = cfg
        self.capture = capture
        self.student_grid = student_grid
        self.target_grid = target_grid
        self.generator = generator
        self.strategy: str = cfg.strategy  # `--keep auto` changes both at each decision
        self.keep: float | int = cfg.keep_value  # with `mass`: the most one image keeps
        self.mass: float | None = cfg.keep_mass

    @property
    def needs_scores(self) -> bool:
        return self.strategy in ("sips", "bottom")

    def __call__(self, batch: int, device: torch.device) -> torch.Tensor | None:
        """[b, K] sorted positions on the target grid, or None for strategy `all` (send the full image)."""
        positions, counts = self.select(batch, device)
        assert counts is None, "per-image K (keep_mass) needs select(), which returns the counts"
        return positions

    def select(self, batch: int, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(positions [b, K] or None for the full image, counts [b] of ragged rows or None when every row has K)."""
        if self.strategy == "all":
            return None, None
        if self.needs_scores:
            assert self.capture is not None and self.capture.scores is not None, "SIPS scores were not captured"
            scores, grid = self.capture.scores, self.student_grid
        else:  # random needs no scores, only their shape
            grid = self.target_grid
            scores = torch.zeros(batch, grid[0] * grid[1], device=device)
        if self.mass is not None and self.strategy == "sips":
            return select_by_mass(scores, self.mass, self.keep, teacher_grid=self.target_grid, student_grid=grid)
        # the student's own scores: a NaN check would make the training thread wait for its forward (a diverged
        # student's loss says so anyway)
        positions = select_patches(
            scores,
            self.keep,
            self.strategy,
            teacher_grid=self.target_grid,
            student_grid=grid,
            generator=self.generator,
            check_finite=False,
        )
        return positions, None

    def kept_share(self, request: TeacherRequest) -> float:
        """Sum over the request's images of the share of the target grid's patches each sends (1 for a full image)."""
        b, total = request.images.shape[0], self.target_grid[0] * self.target_grid[1]
        if request.keep_indices is None:
            return float(b)
        if request.keep_counts is None:
            return b * request.keep_indices.shape[1] / total
        return int(request.keep_counts.sum()) / total


class StepRunner:
    """Forward (pipelined with the teacher) and loss for one batch; the caller runs backward and the optimizer."""

    def __init__(
        self,
        cfg: StepSettings,
        model: nn.Module,
        raw_model: nn.Module,
        normalize: Normalizer,
        criterion: DistillationLoss,
        selector: PatchSelector | None,
        submit: Submit | None,
        request_id_prefix: str,
        precision: str | None = None,
        distiller: FeatureDistiller | None = None,
    ) -> None:
        self.cfg = cfg
        self.distiller = distiller  # --kd manifold|attention: the feature term on the kept patches
        self.model = model  # what the training forward goes through (DDP / MaskedStudent wrapper)
        self.raw_model = raw_model  # the timm student (scores-only forwards in mask-student)
        self.normalize = normalize
        self.criterion = criterion
        self.selector = selector
        self.submit = submit
        self.prefix = request_id_prefix
        param = next(raw_model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        self._device = device
        # "bf16" or "fp32": as given (a run's own, kept across resumes), else resolved from the settings
        self.precision = precision or resolve_precision(cfg.precision, device)
        self._unfused = unfused_attention_modules(raw_model, self.precision, device)
        self._kept: list[float] = []  # this step's micro-batches, in order: `PatchSelector.kept_share` of each
        self._requests: list[TeacherRequest] = []  # this step's teacher requests, in micro-batch order

    @contextlib.contextmanager
    def _forward_context(self) -> Iterator[None]:
        """What every student forward of a step runs in: its precision's autocast, and on a CPU in bf16 its attention
        unfused (see `unfused_attention_modules`)."""
        with student_autocast(self.precision, self._device), attention_unfused(self._unfused):
            yield

    def __call__(
        self, images: torch.Tensor, targets: torch.Tensor, step: int, known: torch.Tensor | None = None
    ) -> StepResult:
        """images [B, C, H, W] in [0, 1] (after mixup), targets [B] or soft [B, classes]. known [P, classes]: teacher
        logits already paid for the first P images (`--keep auto`'s full-image probe answers, kd mode): those rows
        form a micro-batch of their own that sends no request."""
        cfg = self.cfg
        if cfg.mode == "none":
            with self._forward_context():
                output = self.model(self.normalize(images))
            return StepResult(self.criterion(as_float32(output), targets, None), images.shape[0])
        self._kept = []
        self._requests = []
        if self.distiller is not None:
            self.distiller.begin_step()
        micro = list(images.tensor_split(min(cfg.micro_batches, images.shape[0])))
        request_id: Callable[[int], str] = lambda i: f"{self.prefix}-s{step}-m{i}"  # noqa: E731 - a one-line id rule
        submit = self.submit
        if known is not None:
            assert cfg.mode == "kd" and submit is not None
            rest = images[known.shape[0] :]
            micro = [images[: known.shape[0]]]
            micro += list(rest.tensor_split(min(cfg.micro_batches, rest.shape[0]))) if rest.shape[0] else []
            request_id = lambda i: _KNOWN if i == 0 else f"{self.prefix}-s{step}-m{i - 1}"  # noqa: E731 - a one-line id rule
            submit = _answering_known(submit, known)
        if cfg.mode == "kd" and self.selector is not None and not self.selector.needs_scores:
            # random / all: the kept patches do not depend on the student, so every request goes out before the
            # first student forward and the teacher's whole time can hide behind the student's (same ids, bytes)
            early = [self._teacher_request(x) for x in micro]
            result = pipelined_forward(
                micro,
                self._student_forward,
                submit,
                request_id=request_id,
                early_requests=early,
                timeout_s=cfg.teacher_wait_s,
            )
        elif cfg.mode == "kd":
            result = pipelined_forward(
                micro, self._kd_student_step, submit, request_id=request_id, timeout_s=cfg.teacher_wait_s
            )
        else:
            early = [TeacherRequest(x, None) for x in micro]
            self._kept = [float(x.shape[0]) for x in micro]
            result = pipelined_forward(
                micro,
                self._masked_student_step,
                submit,
                request_id=request_id,
                early_requests=early,
                timeout_s=cfg.teacher_wait_s,
            )
        assert result.teacher_logits is not None
        output = concat_outputs(result.outputs)
        teacher_logits = to_device(torch.cat(result.teacher_logits), images.device)  # [B, classes]
        loss = self.criterion(output, targets, teacher_logits)
        if self.distiller is not None:
            feature = self.distiller.loss(self._requests, result.teacher_outputs)
            loss = LossParts(loss.total + feature, loss.ce, loss.kd, feature.detach())
        if known is not None:  # answered from the full-image probe
            self._kept[0] = float(known.shape[0])
        return StepResult(loss, images.shape[0], result.usage, result.stats, kept=sum(self._kept))

    def _kd_student_step(self, i: int, x: torch.Tensor) -> tuple[Any, TeacherRequest]:
        output, _ = self._student_forward(i, x)  # SIPSCapture fills selector.capture.scores here (fp32)
        return output, self._teacher_request(x)

    def _student_forward(self, i: int, x: torch.Tensor) -> tuple[Any, None]:
        with self._forward_context():
            output = self.model(self.normalize(x))
        if self.distiller is not None:
            self.distiller.after_forward()
        return output, None

    def _teacher_request(self, x: torch.Tensor) -> TeacherRequest:
        """The kept positions of micro-batch x (after its forward for SIPS / bottom) and its pixels. The positions stay
        on the student's device: the client gathers and copies them off this thread (off_thread.py), where a copy to
        the host here would make the training thread wait for the device."""
        assert self.selector is not None
        keep, counts = self.selector.select(x.shape[0], x.device)
        request = TeacherRequest(
            x.detach(), keep, counts, outputs=(self.distiller.output,) if self.distiller is not None else ()
        )
        self._requests.append(request)
        self._kept.append(self.selector.kept_share(request))
        return request

    def _masked_student_step(self, i: int, x: torch.Tensor) -> tuple[Any, None]:
        xn = self.normalize(x)
        assert self.selector is not None
        if self.selector.needs_scores:  # the student's own attention on the full image, without grad
            with torch.no_grad(), self._forward_context():
                self.raw_model(xn)
        keep = self.selector(x.shape[0], x.device)
        with self._forward_context():
            return self.model(xn, keep_indices=keep), None


_KNOWN = "known-answer"  # the request id StepRunner gives the micro-batch whose teacher answer it already has


def _answering_known(submit: Submit, known: torch.Tensor) -> Submit:
    """`submit`, except that the request named _KNOWN is answered with `known` at no cost and not sent."""

    def wrapped(**kwargs: Any) -> Future[Any]:
        if kwargs.get("request_id") != _KNOWN:
            return submit(**kwargs)
        done: Future[Any] = Future()
        done.set_result((known, Usage()))
        return done

    return wrapped
