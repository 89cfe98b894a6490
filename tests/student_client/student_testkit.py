"""Shared pieces of the student_client tests: a small real-image subset, a tiny teacher, a real server, the ledger,
and a run of the tiny student as a TrainConfig or as `student-client train` flags.

Not a conftest.py: `tests/conftest.py` is imported as `conftest` by other test files, and a second conftest module
here would shadow it.
"""

from __future__ import annotations

import os
import sqlite3
import tarfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.nn.modules.module import register_module_forward_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.hooks import RemovableHandle

from student_client.command import student_client_command, train_argv
from student_client.config import TrainConfig
from student_client.transport.wire import ModelInfo
from teacher_server.settings import ServerSettings
from teacher_server.testing.server import RunningServer, running_server

REPO = Path(__file__).resolve().parents[2]
CIFAR = REPO / "data" / "cifar10-subset"
# 2-block CIFAR-size ViT (8x8 grid of 4x4 patches): cheap enough for a real training step on 2 cores.
STUDENT = "vit_tiny_patch16_224"
STUDENT_KWARGS = {"img_size": 32, "patch_size": 4, "depth": 2}
# what a teacher of the tiny geometry (32 px, 4 px patches, 10 classes) announces: requests built without a server
TINY_INFO = ModelInfo(
    image_size=(32, 32),
    patch_size=4,
    in_chans=3,
    num_prefix_tokens=1,
    num_classes=10,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    model="tiny",
    full_gflops=1.0,
    price_per_gflop=0.0,
    currency="USD",
)


def make_subset(root: Path, *, train_per_class: int = 4, test_per_class: int = 2) -> Path:
    """An ImageFolder tree of symlinks to the first files of each CIFAR class (real images, few of them)."""
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for class_dir in sorted((CIFAR / split).iterdir()):
            dst = root / split / class_dir.name
            dst.mkdir(parents=True, exist_ok=True)
            for f in sorted(class_dir.iterdir())[:n]:
                os.symlink(f, dst / f.name)
    return root


def make_archive(tmp_path: Path, *, train_per_class: int = 1) -> Path:
    """`tmp_path/shared/cifar-small.tar.gz`: a CIFAR subset with one top-level folder, as `tar czf` makes it."""
    subset = make_subset(tmp_path / "cifar-small", train_per_class=train_per_class, test_per_class=1)
    archive = tmp_path / "shared" / "cifar-small.tar.gz"
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz", dereference=True) as tar:  # the subset is symlinks: store the images
        tar.add(subset, arcname="cifar-small")
    return archive


def tiny_teacher(seed: int = 0, **overrides: object) -> nn.Module:
    torch.manual_seed(seed)
    kwargs = {"img_size": 32, "patch_size": 4, "num_classes": 10, "depth": 2, **overrides}
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).eval()


def unjoined(request_images: int) -> dict[str, object]:
    """Teacher settings under which each request of `request_images` images runs as a forward of its own. A CPU
    teacher's logits move with the rows batched beside them (the tiny teacher: 4 + 4 rows against 8 differ in 1
    batch of 5 in bf16, 8 against 16 in every batch in float32), and a student trains on those logits, so runs whose
    sent bytes a test compares must not let timing decide which requests share a forward."""
    return {"max_batch_images": request_images}


@contextmanager
def teacher_server(tmp: Path, model: nn.Module, **settings: object) -> Iterator[RunningServer]:
    """A real gRPC teacher on 127.0.0.1 with a real SQLite ledger in `tmp`."""
    cfg = ServerSettings(
        model="vit_tiny_patch16_224", db=f"sqlite:///{tmp / 'ledger.db'}", metrics_port=None, **settings
    )
    with running_server(cfg, model=model) as srv:
        yield srv


def ledger_rows_at(db: Path | str, key_name: str) -> list[dict[str, object]]:
    """Usage rows of one key, read straight from the SQLite file (the documented ledger schema)."""
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        rows = conn.execute(
            "SELECT u.request_id, u.images, u.tokens, u.gflops, u.full_gflops, u.cost, u.purpose FROM usage u "
            "JOIN api_keys k ON k.id = u.api_key_id WHERE k.name = ? ORDER BY u.id",
            (key_name,),
        ).fetchall()
    return [dict(r) for r in rows]


def ledger_rows(srv: RunningServer, key_name: str) -> list[dict[str, object]]:
    """Usage rows of one key of a running test server's SQLite ledger."""
    return ledger_rows_at(srv.settings.db.removeprefix("sqlite:///"), key_name)


def tiny_config(
    data: Path | str, out: Path | str, srv: RunningServer | None = None, key: str | None = None, **fields: Any
) -> TrainConfig:
    """A run of the tiny student (STUDENT, STUDENT_KWARGS, unless `fields` name another) on `data`, writing to `out`;
    with `srv`, distilled from that teacher under the API key `key`; no progress bar unless `progress=True`."""
    served = {"teacher": srv.address, "api_key": key} if srv is not None else {}
    base = {"student": STUDENT, "student_kwargs": STUDENT_KWARGS, "progress": False}
    return TrainConfig(**{"data": str(data), "out": str(out), **served, **base, **fields})


def train_flags(**fields: Any) -> list[str]:
    """`train` and a flag per field, what follows `student-client` on a user's command line (student_client.command's
    train_argv without the command): the tiny student unless `fields` name another."""
    argv = train_argv(**{"student": STUDENT, "student_kwargs": STUDENT_KWARGS, **fields})
    return argv[len(student_client_command()) :]


class ScalarReads(TorchDispatchMode):
    """While entered, on this thread, in order: the student's forwards (a timm VisionTransformer's), the first op of
    each backward, and every scalar read (`float(tensor)`, `.item()`: `aten._local_scalar_dense` on any device, a
    host sync on a GPU). The teacher server's forwards run on its own threads and are not seen."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []
        self.thread = threading.get_ident()
        self._hook: RemovableHandle | None = None

    def __enter__(self) -> ScalarReads:
        self._hook = register_module_forward_hook(self._student_forward)
        return super().__enter__()  # type: ignore[no-any-return]

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        if self._hook is not None:
            self._hook.remove()

    def _student_forward(self, module: nn.Module, *_: Any) -> None:
        if isinstance(module, VisionTransformer) and threading.get_ident() == self.thread:
            self.events.append("forward")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.aten._local_scalar_dense.default:
            self.events.append("read")
        elif torch._C._current_autograd_node() is not None and self.events[-1:] != ["backward"]:
            self.events.append("backward")
        return func(*args, **(kwargs or {}))

    def between_forward_and_backward(self) -> list[int]:
        """For each backward that follows a student forward (a step's), the scalar reads after that forward."""
        counts, reads, after_forward = [], 0, False
        for event in self.events:
            if event == "forward":
                reads, after_forward = 0, True
            elif event == "read":
                reads += 1
            elif after_forward:
                counts.append(reads)
                after_forward = False
        return counts
