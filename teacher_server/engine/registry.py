"""The models a server serves: name -> masked teacher (with its geometry), meter and micro-batcher."""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

from maskedkd.checkpoints import load_model
from maskedkd.masked_teacher import MaskedTeacher
from maskedkd.precision import DTYPES, dtype_name, resolve_dtype
from maskedkd.text import clip
from teacher_server.engine.batcher import ForwardFn, TokenBudgetBatcher
from teacher_server.engine.compiled import forward_patches_fn, warm_up_shapes
from teacher_server.engine.fidelity import FLOAT32_ITSELF, DtypeFidelity, measure
from teacher_server.engine.metering import Meter
from teacher_server.engine.packing import run_packed, supports_packing
from teacher_server.errors import ModelNotFoundError
from teacher_server.settings import ServerSettings

log = logging.getLogger(__name__)

__all__ = ["DTYPES", "ModelLoadError", "ModelRegistry", "ServedModel", "build_served_model", "load_teacher"]


class ModelLoadError(RuntimeError):
    """The configured teacher cannot be loaded (message says why)."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda asked for, but torch sees no CUDA device")
    return torch.device(device)


def make_forward(teacher: MaskedTeacher, device: torch.device, dtype: torch.dtype, compile_mode: str = "off",
                 *, pack: bool = False) -> ForwardFn:
    """The batcher's forward: CPU inputs (or, on CUDA, rows the prefetcher already staged there) in, CPU float32
    logits out, compute on `device` in `dtype`.

    On CUDA the inputs are copied from pinned host memory without blocking the host (the copy is queued on the
    stream ahead of the forward that reads it)."""
    forward_patches = forward_patches_fn(teacher, compile_mode)
    on_cuda = device.type == "cuda"

    def forward(patches: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
        if on_cuda and not patches.is_cuda:  # rows the prefetcher staged are on the device already (not pinnable)
            patches, indices = patches.pin_memory(), indices.pin_memory()
        x = patches.to(device=device, dtype=dtype, non_blocking=on_cuda)          # [G,K,C,P,P]
        idx = indices.to(device, non_blocking=on_cuda)                            # [G,K]
        cnt = counts.to(device) if counts is not None else None                   # [G]
        if pack and cnt is not None:  # ragged rows (`--mixed-k pack`): all tokens in one sequence, no padding
            return run_packed(teacher, x, idx, cnt).float().cpu()  # [G,classes]
        return forward_patches(x, idx, cnt).float().cpu()  # [G,classes]

    return forward


@dataclass
class ServedModel:
    name: str
    teacher: MaskedTeacher                # its `geometry` is what requests are checked against
    meter: Meter
    batcher: TokenBudgetBatcher
    device: torch.device
    dtype_name: str                       # the resolved dtype ("auto" never reaches here)
    fidelity: DtypeFidelity | None = None  # the start-up check against float32


def load_teacher(settings: ServerSettings, model: nn.Module | None = None,
                 ) -> tuple[str, MaskedTeacher, DtypeFidelity]:
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
            model, meta = load_model(settings.model, checkpoint=settings.checkpoint,
                                     model_kwargs=settings.model_kwargs or None, pretrained=settings.pretrained)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(str(exc).splitlines()[0]) from exc
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
        teacher = MaskedTeacher(model.to(device=device, dtype=torch.float32).eval())
    except TypeError as exc:
        raise ModelLoadError(str(exc)) from exc
    teacher, fidelity = _in_checked_dtype(teacher, dtype, settings)
    return settings.served_name or arch, teacher, fidelity


def _in_checked_dtype(teacher: MaskedTeacher, dtype: torch.dtype, settings: ServerSettings,
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
    log.warning("dtype float32: auto chose %s, but its answers moved too far from float32 (%s; agreement %.4f, "
                "KL %.3g nats); serving float32", dtype_name(dtype), limits, fidelity.agreement, fidelity.kl)
    return teacher, fidelity


class ModelRegistry:
    """Served models by name; the first added is the default (an empty `model` field in a request)."""

    def __init__(self) -> None:
        self._models: dict[str, ServedModel] = {}
        self.default: str | None = None

    def add(self, served: ServedModel) -> None:
        if served.name in self._models:
            raise ValueError(f"model {served.name!r} is served twice")
        self._models[served.name] = served
        self.default = self.default or served.name

    @property
    def names(self) -> list[str]:
        return list(self._models)

    def get(self, name: str) -> ServedModel:
        served = self._models.get(name or self.default or "")
        if served is None:
            raise ModelNotFoundError(f"unknown model {clip(name)}; this server serves: {', '.join(self.names)}")
        return served

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._models.values())


def build_served_model(
    name: str, teacher: MaskedTeacher, settings: ServerSettings, *, fidelity: DtypeFidelity | None = None,
    **batcher_kwargs: object,
) -> ServedModel:
    """Meter and batcher around a loaded teacher; `batcher_kwargs` go to TokenBudgetBatcher (finalize, metrics)."""
    weight = next(teacher.parameters())
    pack = settings.mixed_k == "pack" and supports_packing(teacher)
    if settings.mixed_k == "pack" and not pack:
        log.info("--mixed-k pack: %s is not a plain class-token ViT; ragged rows are bucketed instead", name)
    forward = make_forward(teacher, weight.device, weight.dtype, settings.compile, pack=pack)
    if settings.compile_shapes:
        try:
            warm_up_shapes(forward, teacher, settings.compile_shapes)
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from exc
    batcher = TokenBudgetBatcher(
        forward, num_prefix_tokens=teacher.geometry.num_prefix_tokens,
        token_budget=settings.token_budget, max_batch_images=settings.max_batch_images,
        max_delay_s=settings.max_delay_ms / 1000.0, mixed_k=settings.mixed_k if pack or settings.mixed_k != "pack"
        else "bucket", name=name,
        prefetch_device=weight.device, **batcher_kwargs,  # type: ignore[arg-type]
    )
    return ServedModel(name=name, teacher=teacher, meter=Meter(teacher.shape),
                       batcher=batcher, device=weight.device, dtype_name=dtype_name(weight.dtype),
                       fidelity=fidelity)
