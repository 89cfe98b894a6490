"""The served model: the loaded teacher with its forward, meter and micro-batcher, under the name clients use."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from maskedkd.masked_teacher import MaskedTeacher
from maskedkd.precision import dtype_name
from maskedkd.text import clip
from teacher_server.engine.batcher import ForwardFn, TokenBudgetBatcher
from teacher_server.engine.compiled import forward_patches_fn, warm_up_shapes
from teacher_server.engine.fidelity import DtypeFidelity
from teacher_server.engine.metering import Meter
from teacher_server.engine.packing import run_packed, supports_packing
from teacher_server.engine.teacher_loader import ModelLoadError
from teacher_server.errors import ModelNotFoundError
from teacher_server.settings import ServerSettings

log = logging.getLogger(__name__)


def make_forward(
    teacher: MaskedTeacher, device: torch.device, dtype: torch.dtype, compile_mode: str = "off", *, pack: bool = False
) -> ForwardFn:
    """The batcher's forward: CPU inputs (or, on CUDA, rows the prefetcher already staged there) in, CPU float32
    logits out, compute on `device` in `dtype`.

    On CUDA the inputs are copied from pinned host memory without blocking the host (the copy is queued on the
    stream ahead of the forward that reads it)."""
    forward_patches = forward_patches_fn(teacher, compile_mode)
    on_cuda = device.type == "cuda"

    def forward(patches: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
        if on_cuda and not patches.is_cuda:  # rows the prefetcher staged are on the device already (not pinnable)
            patches, indices = patches.pin_memory(), indices.pin_memory()
        x = patches.to(device=device, dtype=dtype, non_blocking=on_cuda)  # [G,K,C,P,P]
        idx = indices.to(device, non_blocking=on_cuda)  # [G,K]
        cnt = counts.to(device) if counts is not None else None  # [G]
        if pack and cnt is not None:  # ragged rows (`--mixed-k pack`): all tokens in one sequence, no padding
            return run_packed(teacher, x, idx, cnt).float().cpu()  # [G,classes]
        return forward_patches(x, idx, cnt).float().cpu()  # [G,classes]

    return forward


@dataclass
class ServedModel:
    name: str
    teacher: MaskedTeacher  # its `geometry` is what requests are checked against
    meter: Meter
    batcher: TokenBudgetBatcher
    device: torch.device
    dtype_name: str  # the resolved dtype ("auto" never reaches here)
    fidelity: DtypeFidelity | None = None  # the start-up check against float32

    def named(self, name: str) -> ServedModel:
        """This model when a request names it (or names none); `ModelNotFoundError` for any other name."""
        if name and name != self.name:
            raise ModelNotFoundError(f"unknown model {clip(name)}; this server serves: {self.name}")
        return self


def build_served_model(
    name: str,
    teacher: MaskedTeacher,
    settings: ServerSettings,
    *,
    fidelity: DtypeFidelity | None = None,
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
        forward,
        num_prefix_tokens=teacher.geometry.num_prefix_tokens,
        token_budget=settings.token_budget,
        max_batch_images=settings.max_batch_images,
        max_delay_s=settings.max_delay_ms / 1000.0,
        mixed_k=settings.mixed_k if pack or settings.mixed_k != "pack" else "bucket",
        name=name,
        prefetch_device=weight.device,
        **batcher_kwargs,  # type: ignore[arg-type]  # the batcher's keyword arguments, passed through
    )
    return ServedModel(
        name=name,
        teacher=teacher,
        meter=Meter(teacher.shape),
        batcher=batcher,
        device=weight.device,
        dtype_name=dtype_name(weight.dtype),
        fidelity=fidelity,
    )
