"""The feature term of a distillation step (`--kd manifold|attention`, paper section 4.1): the student's final patch
tokens or every block's class attention, captured with their graph during the normal training forward, against what
the teacher answers for the kept patches only (`outputs`: `patch_tokens` or `cls_attention`), added to CE + lambda KD.

The teacher computes these for the kept patches alone, so they cost nothing beyond the masked forward already billed
(the bill is the logits-only request's), and only the kept patches' features travel back. The loss runs per
micro-batch (App. E pipelining sends one request each) and is averaged over the micro-batches by their size; the
manifold's inter-image and random relations are therefore taken within a micro-batch. A micro-batch answered without
features (`--keep auto`'s probe answers, which are full-image logits) adds no feature term.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import torch
from torch import nn

from student_client.distill.feature_capture import StudentFeatureCapture
from student_client.distill.feature_kd import FeatureKD, check_teacher_features, feature_kd_term
from student_client.distill.pipeline import Submit, TeacherRequest
from student_client.errors import TeacherAnswerError
from student_client.transport.off_thread import to_device

KD_KINDS = ("logit", "manifold", "attention")
TEACHER_OUTPUT = {"manifold": "patch_tokens", "attention": "cls_attention"}


def check_teacher_outputs(kd: str, offered: tuple[str, ...], model: str) -> None:
    """--kd manifold|attention: the teacher must answer the kept patches' tokens / class attention."""
    needed = TEACHER_OUTPUT.get(kd)
    if needed is not None and needed not in offered:
        raise ValueError(
            f"--kd {kd} needs the teacher's {needed}, which {model} does not offer "
            f"(it offers: {', '.join(offered) or 'logits only'}; a teacher server older than outputs, "
            "or one merging tokens with --tome-r)"
        )


class FeatureDistiller:
    """Captures the student's features per micro-batch and turns the teacher's into the feature loss of a step."""

    def __init__(
        self,
        kind: str,
        weight: float,
        raw_model: nn.Module,
        *,
        student_grid: tuple[int, int] | None,
        teacher_grid: tuple[int, int],
    ) -> None:
        self.config = FeatureKD(kind=kind, weight=weight)  # ValueError for an unknown kind or a bad weight
        self.capture = StudentFeatureCapture(raw_model, tokens=kind == "manifold", attention=kind == "attention")
        self.output = TEACHER_OUTPUT[kind]  # what each teacher request asks for besides logits
        self.student_grid = student_grid
        self.teacher_grid = teacher_grid
        self.generator = torch.Generator()  # the manifold's random sampling, reseeded every step
        self._student: list[torch.Tensor] = []

    def begin_step(self) -> None:
        self._student = []

    def after_forward(self) -> None:
        """Keep what the training forward of the next micro-batch captured (with its graph)."""
        manifold = self.config.kind == "manifold"
        self._student.append(self.capture.tokens if manifold else self.capture.attention)

    def checked(self, submit: Submit) -> Submit:
        """`submit`, whose futures fail with TeacherAnswerError when the features answered cannot be used (another
        shape than the request's, NaN or inf, negative attention): checked on the thread the answer arrives on, so
        the training thread reads none of their values between its forward and its backward."""

        def checked_submit(**kwargs: Any) -> Future[Any]:
            answered: Future[Any] = Future()
            sent = submit(**kwargs)
            images = kwargs.get("images")
            to_card = isinstance(images, torch.Tensor) and images.is_cuda
            sent.add_done_callback(lambda done: self._relay(done, answered, kwargs.get("keep_indices"), to_card))
            return answered

        return checked_submit

    def _relay(self, done: Future[Any], answered: Future[Any], keep: torch.Tensor | None, to_card: bool) -> None:
        """Client thread: `done`'s outcome to `answered`, a TeacherAnswerError instead of unusable features; for a
        student on a GPU the features are pinned here (~10 MB a micro-batch at DeiT-S geometry), so the step's copy to
        the card makes no host copy on the training thread. Whatever happens here reaches `answered`: a callback's own
        exception would be logged and leave the step waiting."""
        if done.cancelled():
            answered.cancel()
            return
        try:
            answer = done.result()  # InferResult: (logits [b, classes], usage) and .outputs
            features = getattr(answer, "outputs", {}).get(self.output)
            if features is not None:
                kept = self.teacher_grid[0] * self.teacher_grid[1] if keep is None else keep.shape[1]
                try:
                    check_teacher_features(self.config.kind, features, batch=answer[0].shape[0], kept=kept)
                except ValueError as bad:
                    raise TeacherAnswerError(f"the teacher's answer cannot be distilled: {bad}") from None
                if to_card:
                    answer.outputs[self.output] = features.pin_memory()  # to_device then copies it as it is
        except BaseException as error:  # noqa: BLE001 - the teacher's error, or the check's, goes to the step
            answered.set_exception(error)
            return
        answered.set_result(answer)

    def loss(self, requests: Sequence[TeacherRequest], answers: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
        """The size-weighted mean over the micro-batches of `FeatureKD.weight x` the feature loss on the kept patches;
        requests/answers: per micro-batch, what was sent and the teacher's extra outputs (checked on arrival:
        `checked`). Reads no value, so on a GPU the backward is queued without waiting for the forward."""
        if len(self._student) != len(requests) or len(requests) != len(answers):
            raise RuntimeError(
                f"feature KD: {len(self._student)} student forwards, {len(requests)} requests, {len(answers)} answers"
            )
        total: torch.Tensor | None = None
        images = 0
        for student, request, answer in zip(self._student, requests, answers, strict=True):
            if self.output not in answer:  # answered without features (keep auto's probe answers)
                continue
            teacher = to_device(answer[self.output], student.device)  # [b, K, D_t] or [b, L_t, (H_t,) K]
            b = student.shape[0]
            keep = request.keep_indices  # [b, K] on the student's device
            if keep is None:  # the full image: every patch, in grid order
                keep = torch.arange(self.teacher_grid[0] * self.teacher_grid[1], device=student.device).expand(b, -1)
            part = feature_kd_term(
                self.config,
                student.float(),
                teacher.float(),
                keep,
                request.keep_counts,
                student_grid=self.student_grid,
                teacher_grid=self.teacher_grid,
                generator=self.generator,
            )
            total = part * b if total is None else total + part * b
            images += b
        if total is None:
            device = self._student[0].device if self._student else torch.device("cpu")
            return torch.zeros((), device=device)
        return total / images

    def close(self) -> None:
        self.capture.remove()
