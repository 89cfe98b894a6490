"""Loading the teacher: the timm model from a name or checkpoint, on the configured device, in the dtype `--dtype`
resolves to and the start-up fidelity check passes (fidelity.py)."""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from maskedkd.checkpoints import load_model
from maskedkd.masked_teacher import MaskedTeacher
from maskedkd.precision import dtype_name, resolve_dtype
from maskedkd.text import first_line
from maskedkd.tome import ToMeTeacher
from teacher_server.engine.teacher.fidelity import FLOAT32_ITSELF, DtypeFidelity, measure
from teacher_server.settings import ServerSettings

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The configured teacher cannot be loaded (message says why)."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda asked for, but torch sees no CUDA device")
    return torch.device(device)


def load_teacher(settings: ServerSettings, model: nn.Module | None = None) -> tuple[str, MaskedTeacher, DtypeFidelity]:
    """(served name, teacher on the configured device and resolved dtype, its fidelity against float32).

    Raises ModelLoadError, with the numbers in one line, when an explicitly asked dtype fails the fidelity check
    against float32 (fidelity.py); `--dtype auto` serves float32 instead.
    """
    device = resolve_device(settings.device)
    dtype, why = resolve_dtype(settings.dtype, device)
    log.info("dtype %s: %s", dtype_name(dtype), why)
    if model is None:
        if not settings.model and not settings.checkpoint:
            raise ModelLoadError("no teacher given: pass --model NAME and/or --checkpoint PATH")
        try:
            model, meta = load_model(
                settings.model,
                checkpoint=settings.checkpoint,
                model_kwargs=settings.model_kwargs or None,
                pretrained=settings.pretrained,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(first_line(exc)) from exc
        arch = meta.model_name
    else:
        if isinstance(model, MaskedTeacher):
            model = model.model
        cfg = getattr(model, "pretrained_cfg", None) or {}
        arch = settings.model or cfg.get("architecture") or type(model).__name__
        weight = next(model.parameters())
        if weight.device != device or weight.dtype != dtype:
            model = copy.deepcopy(model)  # never convert the caller's module in place
    try:
        model = model.to(device=device, dtype=torch.float32).eval()
        teacher = ToMeTeacher(model, settings.tome_r) if settings.tome_r else MaskedTeacher(model)
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(str(exc)) from exc
    teacher, fidelity = _in_checked_dtype(teacher, dtype, settings)
    return settings.served_name or arch, teacher, fidelity


def _in_checked_dtype(
    teacher: MaskedTeacher, dtype: torch.dtype, settings: ServerSettings
) -> tuple[MaskedTeacher, DtypeFidelity]:
    """The float32 `teacher` in `dtype` when the fidelity check passes. When it fails, `--dtype auto` serves float32
    (one log line says why); an explicit dtype raises ModelLoadError with the numbers."""
    if dtype == torch.float32:  # the reference itself
        return teacher, FLOAT32_ITSELF
    converted = copy.deepcopy(teacher).to(dtype=dtype)
    fidelity = measure(teacher, converted)
    log.info("%s", fidelity.line())
    if fidelity.passes(min_agreement=settings.min_dtype_agreement, max_kl=settings.max_dtype_kl):
        return converted, fidelity
    limits = f"--min-dtype-agreement {settings.min_dtype_agreement}, --max-dtype-kl {settings.max_dtype_kl}"
    if settings.dtype != "auto":
        raise ModelLoadError(f"refusing to serve {dtype_name(dtype)}: {fidelity.line()} is outside {limits}")
    log.warning(
        "dtype float32: auto chose %s, but its answers moved too far from float32 (%s; agreement %.4f, "
        "KL %.3g nats); serving float32",
        dtype_name(dtype),
        limits,
        fidelity.agreement,
        fidelity.kl,
    )
    return teacher, fidelity
