"""What the workers of a run do together: the Collective interface (a worker context, or torch.distributed for the
library under DDP), named numbers summed over every worker in one all-reduce, and agreement on a fatal error, so
that every worker stops at the same step with the same message."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist

FATAL_TEACHER_ERROR = "fatal teacher error"  # the message when the worker that failed gave none


class Collective(Protocol):
    """What training and `--keep auto` need of the workers (LocalContext, RayContext, TorchDistCollective)."""

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor: ...
    def all_gather_object(self, obj: Any) -> list[Any]: ...


class TorchDistCollective:
    """torch.distributed's default process group when one is initialized (MaskedKD under DDP), else this process."""

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return tensor
        return summed_over_group(tensor)

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return [obj]
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out


def summed_over_group(tensor: torch.Tensor, gpu: torch.device | None = None) -> torch.Tensor:
    """`tensor` summed over the default process group, on the caller's device. Reduced in a copy on the device the
    backend reduces on: the host under gloo, the worker's GPU (`gpu`, else the current one) under nccl, which reduces
    nothing else (the tensors summed here are small float64 counters made on the host)."""
    on_host = "gloo" in str(dist.get_backend())  # gloo alone, or beside nccl ("cpu:gloo,cuda:nccl")
    device = torch.device("cpu") if on_host else gpu or torch.device("cuda", torch.cuda.current_device())
    moved = tensor.to(device, copy=True)
    dist.all_reduce(moved)
    return moved.to(tensor.device)


def sum_over_workers(ctx: Collective, values: Mapping[str, float], names: Sequence[str]) -> dict[str, float]:
    """Each of `names` summed over every worker: one all-reduce of one float64 tensor laid out in the order of `names`
    (a name this worker did not give counts 0, so every worker sends the same layout). A collective."""
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise KeyError(f"{unknown} not among the summed names {tuple(names)}")
    local = torch.tensor([float(values.get(name, 0.0)) for name in names], dtype=torch.float64)
    return dict(zip(names, ctx.all_reduce(local).tolist(), strict=True))


def first_error(ctx: Collective, message: str | None, default: str = FATAL_TEACHER_ERROR) -> str:
    """Every worker's message (None where it had none) gathered: the first by rank, else `default`. A collective."""
    return next((m for m in ctx.all_gather_object(message) if m), default)


def agree_on_error(ctx: Collective, message: str | None) -> str | None:
    """Whether any worker hit a fatal error, agreed by all: the first message, or None when none did. A collective."""
    if sum_over_workers(ctx, {"failed": 1.0 if message else 0.0}, ("failed",))["failed"] == 0:
        return None
    return first_error(ctx, message)
