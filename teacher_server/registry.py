"""The models a server serves: name -> masked teacher, its geometry, meter and micro-batcher."""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

from maskedkd.text import clip
from teacher_server.batcher import ForwardFn, TokenBudgetBatcher
from teacher_server.checkpoints import load_model
from teacher_server.compiled import forward_patches_fn
from teacher_server.errors import ModelNotFoundError
from teacher_server.masked_teacher import MaskedTeacher
from teacher_server.metering import Meter
from teacher_server.preprocess import ModelSpec
from teacher_server.settings import ServerSettings

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """The configured teacher cannot be loaded (message says why)."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda asked for, but torch sees no CUDA device")
    return torch.device(device)


def model_spec(name: str, teacher: MaskedTeacher) -> ModelSpec:
    return ModelSpec(name=name, img_size=teacher.img_size, patch_size=teacher.patch_size,
                     grid_size=teacher.grid_size, num_patches=teacher.num_patches,
                     num_prefix_tokens=teacher.num_prefix_tokens, num_classes=teacher.num_classes,
                     in_chans=teacher.in_chans, mean=teacher.mean, std=teacher.std)


def make_forward(teacher: MaskedTeacher, device: torch.device, dtype: torch.dtype, compile_mode: str = "off",
                 ) -> ForwardFn:
    """The batcher's forward: CPU float32 inputs in, CPU float32 logits out, compute on `device` in `dtype`."""
    forward_patches = forward_patches_fn(teacher, compile_mode)

    def forward(patches: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
        x = patches.to(device=device, dtype=dtype)               # [G,K,C,P,P]
        idx = indices.to(device)                                  # [G,K]
        cnt = counts.to(device) if counts is not None else None   # [G]
        return forward_patches(x, idx, cnt).float().cpu()  # [G,classes]

    return forward


@dataclass
class ServedModel:
    name: str
    teacher: MaskedTeacher
    spec: ModelSpec
    meter: Meter
    batcher: TokenBudgetBatcher
    device: torch.device
    dtype_name: str


def load_teacher(settings: ServerSettings, model: nn.Module | None = None) -> tuple[str, MaskedTeacher]:
    """(served name, teacher on the configured device and dtype) from a given module or from the settings."""
    device, dtype = resolve_device(settings.device), DTYPES[settings.dtype]
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
    model = model.to(device=device, dtype=dtype).eval()
    try:
        teacher = MaskedTeacher(model)
    except TypeError as exc:
        raise ModelLoadError(str(exc)) from exc
    return settings.served_name or arch, teacher


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
    name: str, teacher: MaskedTeacher, settings: ServerSettings, **batcher_kwargs: object,
) -> ServedModel:
    """Meter and batcher around a loaded teacher; `batcher_kwargs` go to TokenBudgetBatcher (finalize, metrics)."""
    weight = next(teacher.parameters())
    batcher = TokenBudgetBatcher(
        make_forward(teacher, weight.device, weight.dtype, settings.compile), num_prefix_tokens=teacher.num_prefix_tokens,
        token_budget=settings.token_budget, max_batch_images=settings.max_batch_images,
        max_delay_s=settings.max_delay_ms / 1000.0, mixed_k=settings.mixed_k, name=name,
        **batcher_kwargs,  # type: ignore[arg-type]
    )
    return ServedModel(name=name, teacher=teacher, spec=model_spec(name, teacher), meter=Meter(teacher.shape),
                       batcher=batcher, device=weight.device, dtype_name=settings.dtype)
