"""A seeded generator of hostile `InferRequest` bytes for the fuzz test: valid requests mutated field by field (wrong
dtypes, shapes, dimensions, indices, counts, strings) and byte by byte (bit flips, cuts, insertions, invalid UTF-8),
plus raw garbage. Small tensors (patches of a few positions), so most cases are refused before any forward.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import torch

from maskedkd.codec import tensor_to_proto
from maskedkd.v1 import teacher_pb2 as pb

GRID, CHANNELS, PATCH, SIZE = 64, 3, 4, 32  # the tiny teacher of service_testkit: 8x8 grid of 4x4 patches
DIMS = [0, 1, 2, 3, 4, 8, 32, 64, -1, -(1 << 63), (1 << 31), (1 << 40), (1 << 62), (1 << 63) - 1]
DTYPES = [
    "uint8",
    "int16",
    "int32",
    "int64",
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "",
    "UINT8",
    "int8",
    "float32\x00",
    "ü",
]
INDEX_DTYPES = {"int16": torch.int16, "int32": torch.int32, "int64": torch.int64}


def _valid(rng: random.Random, request_id: str) -> pb.InferRequest:
    """A request the tiny teacher accepts: patches or images, uint8 or float, sometimes ragged."""
    batch, k = rng.randint(1, 2), rng.randint(1, 6)
    seed = rng.getrandbits(31)
    g = torch.Generator().manual_seed(seed)
    keep = torch.stack([torch.randperm(GRID, generator=g)[:k] for _ in range(batch)])  # [B, K]
    keep = keep.to(rng.choice([torch.int16, torch.int32, torch.int64]))
    req = pb.InferRequest(request_id=request_id, keep_indices=tensor_to_proto(keep))
    if rng.random() < 0.8:
        patches = torch.randint(0, 256, (batch, k, CHANNELS, PATCH, PATCH), dtype=torch.uint8, generator=g)
        req.patches.CopyFrom(tensor_to_proto(patches if rng.random() < 0.7 else patches.float() / 255))
    else:
        req.images.CopyFrom(
            tensor_to_proto(torch.randint(0, 256, (batch, CHANNELS, SIZE, SIZE), dtype=torch.uint8, generator=g))
        )
    if rng.random() < 0.3:
        req.keep_counts.CopyFrom(tensor_to_proto(torch.tensor([rng.randint(1, k) for _ in range(batch)])))
    return req


def _tensor(req: pb.InferRequest, rng: random.Random) -> pb.Tensor:
    options = [req.keep_indices, req.images if req.HasField("images") else req.patches]
    if req.HasField("keep_counts"):
        options.append(req.keep_counts)
    return rng.choice(options)


def _text(rng: random.Random) -> str:
    n = rng.choice([1, 10, 201, 3000])
    return "".join(rng.choices("aZ\x00é-_ 9\u2603", k=n))


def _mutate_field(req: pb.InferRequest, rng: random.Random) -> None:
    t = _tensor(req, rng)
    kind = rng.randrange(12)
    if kind == 0:
        t.dtype = rng.choice([*DTYPES, _text(rng)])
    elif kind == 1:
        del t.shape[:]
        t.shape.extend(rng.choice(DIMS) for _ in range(rng.choice([0, 1, 2, 5, 16, 17, 65, 100])))
    elif kind == 2 and t.shape:
        t.shape[rng.randrange(len(t.shape))] = rng.choice(DIMS)
    elif kind == 3:
        t.data = t.data[: rng.randrange(len(t.data) + 1)] if rng.random() < 0.5 else t.data + rng.randbytes(9)
    elif kind == 4 and req.keep_indices.dtype in INDEX_DTYPES:  # out-of-range or repeated positions
        keep = req.keep_indices
        dtype = INDEX_DTYPES[keep.dtype]
        size = len(keep.data) - len(keep.data) % dtype.itemsize
        values = torch.frombuffer(bytearray(keep.data[:size]), dtype=dtype) if size else torch.zeros(1, dtype=dtype)
        values[rng.randrange(len(values))] = rng.choice([-1, GRID, 1 << 14, int(values[0])])
        keep.data = values.numpy().tobytes()
    elif kind == 5:
        counts = torch.tensor([rng.choice([0, -1, 7, 1 << 40]) for _ in range(rng.randint(1, 3))])
        req.keep_counts.CopyFrom(tensor_to_proto(counts))
    elif kind == 6:
        req.request_id = _text(rng)
    elif kind == 7:
        req.model = _text(rng)
    elif kind == 8:  # float pixels outside [0, 1] or not finite
        req.patches.CopyFrom(
            tensor_to_proto(
                torch.full((1, 1, CHANNELS, PATCH, PATCH), rng.choice([float("nan"), float("inf"), -0.5, 2.0]))
            )
        )
        req.keep_indices.CopyFrom(tensor_to_proto(torch.tensor([[0]])))
    elif kind == 9:
        req.ClearField("images")
        req.ClearField("patches")
    elif kind == 10:
        req.ClearField("keep_indices")
    else:  # zero-size with huge dimensions
        t.dtype, t.data = "uint8", b""
        del t.shape[:]
        t.shape.extend([0, 1 << 40, 1 << 40])


def _mutate_bytes(raw: bytes, rng: random.Random) -> bytes:
    data = bytearray(raw)
    kind = rng.randrange(5)
    if kind == 0 and data:  # bit flips, mostly in the fields around the tensor payloads
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(min(len(data), 48)) if rng.random() < 0.5 else rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif kind == 1:
        data = data[: rng.randrange(len(data) + 1)]
    elif kind == 2:
        i = rng.randrange(len(data) + 1)
        data[i:i] = rng.randbytes(rng.randint(1, 16))
    elif kind == 3:  # invalid UTF-8 in request_id (field 1 comes first)
        if len(data) > 3 and data[0] == 0x0A:
            data[2] = rng.choice([0xFF, 0xC3, 0x80, 0xED])
    else:
        data = bytearray(rng.randbytes(rng.randint(0, 300)))
    return bytes(data)


def _mutated(req: pb.InferRequest, rng: random.Random, fields: int) -> bytes:
    for _ in range(fields):
        _mutate_field(req, rng)
    return req.SerializeToString()


def fuzz_cases(seed: int, count: int) -> Iterator[bytes]:
    """`count` request payloads, the same for the same seed."""
    rng = random.Random(seed)
    makers: list[Callable[[pb.InferRequest], bytes]] = [
        lambda req: req.SerializeToString(),
        lambda req: _mutated(req, rng, 1),
        lambda req: _mutated(req, rng, 2),
        lambda req: _mutate_bytes(req.SerializeToString(), rng),
    ]
    for _ in range(count):
        request_id = rng.choice(["", f"fz-{rng.getrandbits(64):016x}"])
        yield rng.choices(makers, weights=[1, 6, 3, 8])[0](_valid(rng, request_id))
