"""Checks of a TrainConfig before any worker starts (Ray takes ~25 s to start; a bad value should fail at once):
the data tree, the student's name and kwargs (built on the meta device: no memory, no weights), the fit of --init
weights and of a --resume checkpoint to that student, and the teacher (reachable, the key valid, the same classes).

`UsageError` is a bad value the user gave (the CLI exits 2); other errors (an unreachable teacher) exit 1.
"""

from __future__ import annotations

import difflib
import tarfile
from pathlib import Path

import timm
import torch
from torch import nn

from maskedkd.text import one_line
from student_client.config import TrainConfig


class UsageError(ValueError):
    """A flag's value cannot work; str(err) is one line that names the flag."""


def check_data(cfg: TrainConfig) -> list[str]:
    """--data has train/ with class folders (and val/ or test/ when evaluating); returns the class names."""
    from student_client.data import EVAL_SPLITS, class_names_of, find_split
    from student_client.data_archive import is_archive, local_data_root

    try:
        root = Path(local_data_root(cfg.data))  # an archive: extracted here too, to read its classes
    except tarfile.TarError as err:
        raise UsageError(f"--data: {cfg.data} is not a readable archive: {err}") from err
    if not root.is_dir():
        what = "archive file" if is_archive(cfg.data) else "directory"
        raise UsageError(f"--data: no {what} {cfg.data}")
    if not (root / "train").is_dir():
        raise UsageError(
            f"--data: {cfg.data} has no train/ folder (an ImageFolder tree: train/<class>/*.png, val/ or test/)"
        )
    classes = class_names_of(root)
    if not classes:
        raise UsageError(f"--data: {cfg.data}/train has no class folders")
    if cfg.eval and find_split(root, EVAL_SPLITS) is None:
        raise UsageError(f"--data: {cfg.data} has no val/ or test/ folder to evaluate on (or pass --no-eval)")
    return classes


def build_meta_student(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The student as the workers will build it, on the meta device (shapes only, instant even for ViT-L)."""
    from student_client.distill.sips import SIPSCapture
    from student_client.student import describe_student, student_kwargs_for

    if not timm.is_model(cfg.student):
        close = difflib.get_close_matches(cfg.student, timm.list_models(), n=3, cutoff=0.8)
        hint = f" (did you mean {', '.join(close)}?)" if close else " (timm.list_models() lists them)"
        raise UsageError(f"--student: {cfg.student!r} is not a timm model{hint}")
    kwargs = student_kwargs_for(cfg.student_kwargs, num_classes)
    try:
        with torch.device("meta"):
            model = timm.create_model(cfg.student, pretrained=False, **kwargs)
    except Exception as err:  # timm raises TypeError, ValueError, AssertionError, RuntimeError for bad kwargs
        raise UsageError(
            f"--student-kwargs: cannot build {cfg.student} with {kwargs}: {one_line(err) or type(err).__name__}"
        ) from err
    if cfg.mode != "none" and cfg.strategy in ("sips", "bottom"):
        if describe_student(model).grid_size is None:
            raise UsageError(f"--strategy {cfg.strategy} needs a ViT student; {cfg.student} has no patch grid")
        try:
            SIPSCapture(model).remove()
        except TypeError as err:
            raise UsageError(f"--strategy {cfg.strategy}: {one_line(err)}") from err
    return model


def check_resume(cfg: TrainConfig, model: nn.Module) -> Path | None:
    """With --resume: the newest checkpoint in --out fits the student (the whole mismatch, in one line)."""
    from maskedkd.checkpoints import CheckpointError, load_state_dict
    from student_client.training.checkpointing import MODEL_FILE, latest_checkpoint

    checkpoint = latest_checkpoint(cfg.out) if cfg.resume else None
    if checkpoint is None:
        return None
    try:
        model.load_state_dict(load_state_dict(checkpoint / MODEL_FILE), strict=True, assign=True)
    except (RuntimeError, CheckpointError) as err:
        raise UsageError(
            f"--resume: checkpoint {checkpoint} does not fit --student {cfg.student} "
            f"{cfg.student_kwargs}: {one_line(err)}"
        ) from err
    return checkpoint


def check_init(cfg: TrainConfig, model: nn.Module) -> None:
    """With --init: the weights load into the student (read once here, on the meta device)."""
    from student_client.training.student_init import StudentInitError, init_student

    if cfg.student_init:
        try:
            init_student(model, cfg.student_init, assign=True)
        except StudentInitError as err:
            raise UsageError(str(err)) from err


def check_teacher(cfg: TrainConfig, num_classes: int) -> str:
    """Reach the teacher once: a bad address or key fails here, in one line. Returns the bill's currency."""
    from student_client.distill.feature_step import check_teacher_outputs
    from student_client.transport.client import TeacherClient

    if cfg.mode == "none":
        return ""
    with TeacherClient(
        cfg.teacher or "",
        cfg.api_key or "",
        timeout_s=10.0,
        max_retries=1,
        patience_s=0,
        model=cfg.teacher_model,
        **cfg.teacher_tls,
    ) as client:
        info = client.info()
        client.check_key()
    if info.num_classes != int(cfg.student_kwargs.get("num_classes", num_classes)):
        raise ValueError(
            f"teacher {info.model} predicts {info.num_classes} classes but {cfg.data} has {num_classes} class folders"
        )
    check_teacher_outputs(cfg.kd, info.outputs, info.model)
    return info.currency


def preflight(cfg: TrainConfig) -> str:
    """Every check, cheapest first; returns the teacher's currency ("" without a teacher)."""
    classes = check_data(cfg)
    student = build_meta_student(cfg, len(classes))
    check_init(cfg, student)
    check_resume(cfg, student)
    return check_teacher(cfg, len(classes))
