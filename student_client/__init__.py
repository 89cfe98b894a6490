"""MaskedKD student side: SIPS capture and patch selection, the TeacherClient, KD losses and Ray training.

In one's own loop: `MaskedKD(student, TeacherClient(target, api_key), keep=0.5)`; a whole run:
`train(TrainConfig(...))`. Every name is imported when first used, so `import student_client` for SIPS does not load
grpc or Ray, and a module of the package (the Ray run's controller unpickling a callback) does not load torch and timm.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from student_client.api import train
    from student_client.config import TrainConfig
    from student_client.distill.kd import KDStep, MaskedKD
    from student_client.distill.losses import DistillationLoss, kd_kl_loss
    from student_client.distill.sips import (
        SIPSCapture,
        SIPSUnsupportedModelError,
        select_by_mass,
        select_patches,
        sips_overhead_flops,
    )
    from student_client.errors import (
        TeacherAnswerError,
        TeacherAuthError,
        TeacherError,
        TeacherInputError,
        TeacherQuotaError,
        TeacherUnavailableError,
    )
    from student_client.training.ray_runner import TrainingError
    from student_client.transport.aio_client import AsyncTeacherClient
    from student_client.transport.client import TeacherClient
    from student_client.transport.stream import TeacherStream, TeacherStreams
    from student_client.transport.wire import ModelInfo, Usage

_LAZY = {
    "SIPSCapture": "student_client.distill.sips",
    "SIPSUnsupportedModelError": "student_client.distill.sips",
    "select_by_mass": "student_client.distill.sips",
    "select_patches": "student_client.distill.sips",
    "sips_overhead_flops": "student_client.distill.sips",
    "TeacherClient": "student_client.transport.client",
    "AsyncTeacherClient": "student_client.transport.aio_client",
    "TeacherStream": "student_client.transport.stream",
    "TeacherStreams": "student_client.transport.stream",
    "ModelInfo": "student_client.transport.wire",
    "Usage": "student_client.transport.wire",
    "TeacherError": "student_client.errors",
    "TeacherAnswerError": "student_client.errors",
    "TeacherAuthError": "student_client.errors",
    "TeacherQuotaError": "student_client.errors",
    "TeacherInputError": "student_client.errors",
    "TeacherUnavailableError": "student_client.errors",
    "DistillationLoss": "student_client.distill.losses",
    "kd_kl_loss": "student_client.distill.losses",
    "TrainConfig": "student_client.config",
    "MaskedKD": "student_client.distill.kd",
    "KDStep": "student_client.distill.kd",
    "train": "student_client.api",
    "TrainingError": "student_client.training.ray_runner",
}

__all__ = [  # listed, not derived from _LAZY, so tools see what the package exports
    "AsyncTeacherClient",
    "DistillationLoss",
    "KDStep",
    "MaskedKD",
    "ModelInfo",
    "SIPSCapture",
    "SIPSUnsupportedModelError",
    "TeacherAnswerError",
    "TeacherAuthError",
    "TeacherClient",
    "TeacherError",
    "TeacherInputError",
    "TeacherQuotaError",
    "TeacherStream",
    "TeacherStreams",
    "TeacherUnavailableError",
    "TrainConfig",
    "TrainingError",
    "Usage",
    "kd_kl_loss",
    "select_by_mass",
    "select_patches",
    "sips_overhead_flops",
    "train",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'student_client' has no attribute {name!r}")
