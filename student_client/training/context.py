"""Where the per-worker loop runs: inside a Ray Train worker (DDP, reports, Ray checkpoints) or in-process (tests,
debugging: one worker, no Ray). The training loop only talks to this interface."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from student_client.collective import summed_over_group


class LocalContext:
    """One process, no Ray: rank 0 of 1."""

    under_ray = False

    def __init__(self, device: torch.device | None = None) -> None:
        self.rank = 0
        self.world_size = 1
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.node = "this process"
        self.reports: list[dict[str, Any]] = []

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def prepare_loader(self, loader: DataLoader) -> DataLoader:
        return loader

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        self.reports.append(dict(metrics, checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None))

    @contextmanager
    def restored_checkpoint(self) -> Iterator[Path | None]:
        yield None


class RayContext:
    """A Ray Train worker: DDP through ray.train.torch, reports and checkpoints through ray.train."""

    under_ray = True

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        self._train = ray.train
        self._torch = ray.train.torch
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.node_id = ray.get_runtime_context().get_node_id()
        self.node = f"{socket.gethostname()} (Ray node {self.node_id[:12]})"

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return self._torch.prepare_model(model)

    def prepare_loader(self, loader: DataLoader) -> DataLoader:
        # Our own DistributedSampler is already set (deterministic order, so a resume can skip done batches).
        return self._torch.prepare_data_loader(loader, add_dist_sampler=False, move_to_device=True)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1 and dist.is_initialized():
            return summed_over_group(t, self.device)
        return t

    def all_gather_object(self, obj: Any) -> list[Any]:
        if self.world_size > 1 and dist.is_initialized():
            out: list[Any] = [None] * self.world_size
            dist.all_gather_object(out, obj)
            return out
        return [obj]

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        checkpoint = self._train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        self._train.report(dict(metrics, node=self.node_id), checkpoint=checkpoint)  # the driver shows the node
        if metrics.get("kind") == "epoch":
            # Ray Train holds one undelivered report per worker and polls every ~2 s; a second report blocks until the
            # epoch row (and its checkpoint) was taken, so the driver has printed it before the next epoch trains,
            # as a Ctrl-C right after the line expects. The driver ignores the marker.
            self._train.report({"kind": "delivered", "node": self.node_id})

    @contextmanager
    def restored_checkpoint(self) -> Iterator[Path | None]:
        """The checkpoint Ray restored after a worker failure (None on a first attempt)."""
        checkpoint = self._train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as d:
            yield Path(d)


Context = LocalContext | RayContext  # where a worker runs: one process, or a Ray Train worker
