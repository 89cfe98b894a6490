"""Shared pieces of the teacher-service tests: a tiny random ViT (and a module's `model` fixture of it), settings on
a tmp SQLite ledger, request builders, an independent in-process reference (MaskedTeacher + the FLOP model), ledger
readers; what the billing tests of either ledger (SQLite, Postgres) share: concurrent clients and the checks that the
ledger bills exactly what they were answered, a retry that replays, a race for a quota, a usage row to bill; and
`teacher-server serve` run as a user runs it.

Not a conftest.py: `tests/conftest.py` is the one conftest module; a second would shadow it.
"""

from __future__ import annotations

import math
import sqlite3
import subprocess
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import pytest
import timm
import torch
from torch import nn

from maskedkd.codec import proto_to_tensor, tensor_to_proto
from maskedkd.flops import masked_forward_flops
from maskedkd.masked_teacher import MaskedTeacher
from maskedkd.v1 import teacher_pb2 as pb
from maskedkd.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.launcher import serve_argv
from teacher_server.ledger import billing, models
from teacher_server.settings import ServerSettings
from teacher_server.testing.server import RunningServer

MODEL = "vit_tiny_patch16_224"
TINY = {"img_size": 32, "patch_size": 4, "num_classes": 10}  # 8x8 grid of 4x4 patches
GRID_PATCHES = 64
# float32: the server takes uint8 pixels and folds the normalization into the patch projection (forward_pixels), so
# its sums run in another order than the reference's normalize-then-project; logits (|x| ~ 1) differ by ~5e-6.
CLOSE = {"rtol": 1e-4, "atol": 2e-5}
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


def model_fixture(seed: int = 0) -> Any:
    """A module's `model` fixture, the tiny ViT of `seed` built once per module: `model = model_fixture(seed=7)`."""

    @pytest.fixture(scope="module", name="model")
    def model() -> nn.Module:
        return tiny_vit(seed=seed)

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


def assert_retry_replays(
    teacher: pb_grpc.TeacherServiceStub, images: torch.Tensor, keep: torch.Tensor, key: str
) -> pb.InferResponse:
    """Infer `job-1` twice: the first is billed, the retry replays it (the stored logits, bit for bit, and the same
    usage). Returns the first answer."""
    first = teacher.Infer(image_request(images, keep, request_id="job-1"), metadata=auth(key))
    retry = teacher.Infer(image_request(images, keep, request_id="job-1"), metadata=auth(key))
    assert not first.usage.replayed and retry.usage.replayed
    assert retry.logits.data == first.logits.data  # the stored logits, bit for bit
    assert (retry.usage.gflops, retry.usage.cost, retry.usage.tokens) == (
        first.usage.gflops,
        first.usage.cost,
        first.usage.tokens,
    )
    return first


def concurrent_clients(
    teacher: pb_grpc.TeacherServiceStub, keys: dict[str, str], *, unary: tuple[int, int], streams: tuple[int, int]
) -> list[tuple[str, pb.InferResponse]]:
    """All at once: `unary` = (clients, calls) Infer clients and `streams` = (clients, requests) InferStream clients,
    client c under key `k{c % 3}` (of `keys`, name -> secret). Batch sizes and kept counts vary, some unary requests
    leave their id to the server; every stream is answered for each of its ids. Returns (key name, response) pairs."""
    responses: list[tuple[str, pb.InferResponse]] = []
    lock = threading.Lock()

    def unary_client(c: int) -> None:
        name = f"k{c % 3}"
        for i in range(unary[1]):
            batch, k = 1 + (c + i) % 3, 4 + (7 * c + 3 * i) % 60
            req = image_request(
                random_images(batch, c * 10 + i), random_keep(batch, k, i), request_id=f"u{c}-{i}" if i % 2 == 0 else ""
            )  # also server-assigned ids
            resp = teacher.Infer(req, metadata=auth(keys[name]))
            with lock:
                responses.append((name, resp))

    def stream_client(c: int) -> None:
        name = f"k{c % 3}"
        reqs = [
            image_request(random_images(2, 500 + c * 10 + i), random_keep(2, 5 + i * 6, i), request_id=f"s{c}-{i}")
            for i in range(streams[1])
        ]
        got = list(teacher.InferStream(iter(reqs), metadata=auth(keys[name])))
        assert sorted(r.request_id for r in got) == sorted(r.request_id for r in reqs)
        with lock:
            responses.extend((name, r) for r in got)

    with ThreadPoolExecutor(max_workers=unary[0] + streams[0]) as pool:
        futures = [pool.submit(unary_client, c) for c in range(unary[0])]
        futures += [pool.submit(stream_client, c) for c in range(streams[0])]
        for f in futures:
            f.result()
    return responses


def assert_rows_are_the_responses(
    rows: list[dict[str, Any]], responses: list[tuple[str, pb.InferResponse]]
) -> dict[str, dict[str, Any]]:
    """One ledger row per request id, and every response is exactly its row (key, images, tokens, GFLOPs, cost);
    returns the rows by request id."""
    by_id = {r["request_id"]: r for r in rows}
    assert len(by_id) == len(rows)
    for name, resp in responses:
        row = by_id[resp.request_id]
        assert row["key"] == name and not resp.usage.replayed
        assert (row["images"], row["tokens"], row["gflops"], row["full_gflops"], row["cost"]) == (
            resp.usage.images,
            resp.usage.tokens,
            resp.usage.gflops,
            resp.usage.full_gflops,
            resp.usage.cost,
        )
    return by_id


def assert_totals_add_up(
    totals: dict[str, Any],
    rows: list[dict[str, Any]],
    responses: list[tuple[str, pb.InferResponse]],
    names: Iterable[str],
) -> None:
    """Each key's totals (reports.usage_totals) are the sums of its responses' usage: counts exactly, GFLOPs and cost
    row by row exactly and as SQL sums in any order."""
    for name in names:
        mine = [resp.usage for n, resp in responses if n == name]
        t = totals[name]
        assert (t.requests, t.images, t.tokens) == (len(mine), sum(u.images for u in mine), sum(u.tokens for u in mine))
        for field in ("gflops", "full_gflops", "cost"):
            exact = math.fsum(getattr(u, field) for u in mine)
            assert math.fsum(r[field] for r in rows if r["key"] == name) == exact  # row by row, exactly
            assert getattr(t, field) == pytest.approx(exact, rel=1e-12)  # SQL SUM, any order


def serve_cli(*flags: str) -> subprocess.CompletedProcess[str]:
    """`teacher-server serve --model MODEL FLAGS...` as a user runs it, for its exit code and output."""
    return subprocess.run(serve_argv("--model", MODEL, *flags), capture_output=True, text=True, timeout=60)


def billable(
    api_key_id: int, request_id: str, gflops: float, *, digest: str, payload: tuple[bytes, str]
) -> billing.Billable:
    """What the server hands `billing.bill` for one request: 1 image, `gflops` (also its cost) of 2.0 full; `payload`:
    (float32 logits' bytes, "B,C")."""
    row = models.NewUsage(
        api_key_id=api_key_id,
        request_id=request_id,
        model="m",
        images=1,
        tokens=2,
        gflops=gflops,
        full_gflops=2.0,
        cost=gflops,
        latency_ms=1.0,
        queue_ms=0.5,
        batch_images=1,
        content_digest=digest,
    )
    return billing.Billable(row, "lifetime", payload=billing.StoredLogits(*payload))


class QuotaRace(NamedTuple):
    key: str  # the secret of the key `erin`
    images: torch.Tensor  # the one image every request sends, [1, 3, 32, 32]
    keep: torch.Tensor  # its kept patches, [1, 16]
    cost: float  # GFLOPs of one such request
    codes: list[grpc.StatusCode]  # of the requests q0, q1, ... in order


def quota_race(
    srv: RunningServer, teacher: pb_grpc.TeacherServiceStub, *, quota: float, calls: int, needles: tuple[str, ...] = ()
) -> QuotaRace:
    """A key `erin` whose quota is `quota` requests' GFLOPs (one measured on a key `probe`), then `calls` requests
    q0, q1, ... under it all at once (in one micro-batch): each served, or refused with a message naming the quota,
    the key and every one of `needles`."""
    images, keep = random_images(1, 4), random_keep(1, 16, 4)
    cost = teacher.Infer(image_request(images, keep), metadata=auth(srv.create_key("probe"))).usage.gflops
    key = srv.create_key("erin", quota_gflops=quota * cost)

    def call(i: int) -> grpc.StatusCode:
        try:
            teacher.Infer(image_request(images, keep, request_id=f"q{i}"), metadata=auth(key))
            return grpc.StatusCode.OK
        except grpc.RpcError as err:
            assert "quota" in err.details() and "erin" in err.details()
            assert all(needle in err.details() for needle in needles), err.details()
            return err.code()

    with ThreadPoolExecutor(max_workers=calls) as pool:
        codes = list(pool.map(call, range(calls)))
    return QuotaRace(key, images, keep, cost, codes)
