"""Shared pieces of the teacher-service tests: a tiny random ViT, settings on a tmp SQLite ledger, request builders,
an independent in-process reference (MaskedTeacher + the FLOP model) and ledger readers.

Not a conftest.py: `tests/conftest.py` is the one conftest module; a second would shadow it.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import grpc
import timm
import torch
from torch import nn

from maskedkd.codec import proto_to_tensor, tensor_to_proto
from maskedkd.flops import masked_forward_flops
from maskedkd.masked_teacher import MaskedTeacher
from maskedkd.v1 import teacher_pb2 as pb
from maskedkd.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.settings import ServerSettings

MODEL = "vit_tiny_patch16_224"
TINY = {"img_size": 32, "patch_size": 4, "num_classes": 10}  # 8x8 grid of 4x4 patches
GRID_PATCHES = 64
CLOSE = {"rtol": 1e-5, "atol": 1e-6}  # float32 GEMMs of different batch shapes differ in the last bits only
# Served logits against the float32 reference, by the dtype GetModelInfo reports: bf16 keeps 8 bits of mantissa, so
# a 2-block tiny ViT's logits (|x| ~ 1) move by up to ~0.12 (measured on an avx512_bf16 EPYC).
SERVED_CLOSE = {"float32": CLOSE, "bfloat16": {"rtol": 0.1, "atol": 0.1}, "float16": {"rtol": 1e-2, "atol": 1e-2}}


def tiny_vit(seed: int = 0) -> nn.Module:
    """The tiny ViT with random weights (also the small-init tokens, so every part of the forward matters)."""
    torch.manual_seed(seed)
    model = timm.create_model(MODEL, pretrained=False, **TINY).eval()
    with torch.no_grad():
        model.pos_embed.normal_(0, 0.5)
        model.cls_token.normal_(0, 0.5)
        model.head.weight.normal_(0, 0.5)
    return model


def settings(tmp_path: Path, **overrides: Any) -> ServerSettings:
    base: dict[str, Any] = {
        "model": MODEL,
        "model_kwargs": TINY,
        "db": f"sqlite:///{tmp_path / 'ledger.db'}",
        "metrics_port": None,
        "max_delay_ms": 2.0,
    }
    return ServerSettings(**{**base, **overrides})


def stub(address: str) -> tuple[grpc.Channel, pb_grpc.TeacherServiceStub]:
    channel = grpc.insecure_channel(address)
    return channel, pb_grpc.TeacherServiceStub(channel)


def auth(secret: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {secret}")]


def random_keep(batch: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(GRID_PATCHES, generator=g)[:k] for _ in range(batch)])  # [B, K]


def random_images(batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=g)  # [B, C, H, W]


def patches_of(images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[B,C,32,32] + [B,K] -> the kept 4x4 patches [B,K,C,4,4] (written independently of the server's code)."""
    out = torch.empty(keep.shape[0], keep.shape[1], 3, 4, 4, dtype=images.dtype)
    for b in range(keep.shape[0]):
        for j, pos in enumerate(keep[b].tolist()):
            r, c = divmod(pos, 8)
            out[b, j] = images[b, :, r * 4 : (r + 1) * 4, c * 4 : (c + 1) * 4]
    return out


def image_request(
    images: torch.Tensor,
    keep: torch.Tensor | None = None,
    *,
    request_id: str = "",
    counts: torch.Tensor | None = None,
    model: str = "",
) -> pb.InferRequest:
    req = pb.InferRequest(request_id=request_id, model=model, images=tensor_to_proto(images))
    if keep is not None:
        req.keep_indices.CopyFrom(tensor_to_proto(keep))
    if counts is not None:
        req.keep_counts.CopyFrom(tensor_to_proto(counts))
    return req


def patch_request(
    patches: torch.Tensor, keep: torch.Tensor, *, request_id: str = "", counts: torch.Tensor | None = None
) -> pb.InferRequest:
    req = pb.InferRequest(request_id=request_id, patches=tensor_to_proto(patches), keep_indices=tensor_to_proto(keep))
    if counts is not None:
        req.keep_counts.CopyFrom(tensor_to_proto(counts))
    return req


def logits_of(response: pb.InferResponse) -> torch.Tensor:
    return proto_to_tensor(response.logits)


class Reference:
    """What the server must answer, computed in-process: MaskedTeacher.forward on normalized full images."""

    def __init__(self, model: nn.Module) -> None:
        self.teacher = MaskedTeacher(model)
        self.mean = torch.tensor(self.teacher.geometry.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(self.teacher.geometry.std).view(1, 3, 1, 1)

    def logits(
        self, images: torch.Tensor, keep: torch.Tensor | None = None, counts: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        with torch.inference_mode():
            return self.teacher((x - self.mean) / self.std, keep, counts)

    def gflops(self, counts: list[int]) -> float:
        return sum(masked_forward_flops(self.teacher.shape, k).total for k in counts) / 1e9

    def full_gflops(self, images: int) -> float:
        return images * masked_forward_flops(self.teacher.shape, GRID_PATCHES).total / 1e9


def ledger_rows(db_url: str) -> list[dict[str, Any]]:
    """All usage rows with their key's name, read straight from the SQLite file (the documented schema)."""
    with sqlite3.connect(db_url.removeprefix("sqlite:///")) as conn:
        conn.row_factory = sqlite3.Row
        rows = conn.execute(
            "SELECT k.name AS key, u.* FROM usage u JOIN api_keys k ON k.id = u.api_key_id ORDER BY u.id"
        ).fetchall()
    return [dict(r) for r in rows]
