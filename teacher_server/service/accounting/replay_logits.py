"""A billed answer's logits as its replay payload keeps them, and back: exactly the float32 values that were sent.

The served logits are float32. Those of a bf16 forward are bf16 values cast up, so the low 16 bits of every value are
0: they are kept as the high halves alone (`bfloat16`: half the bytes in the ledger and half its commit's writes).
That is decided per answer from the values themselves, never from the served dtype, so an answer any of whose values
has low bits set (a float32 forward, a float32 step after the head) is kept whole as float32. Reading the halves back
shifts them up again: bit for bit the values sent, NaN payloads and signs included. Little-endian hosts only, as the
codec (maskedkd/codec.py)."""

from __future__ import annotations

import torch

from teacher_server.ledger.billing import StoredLogits

BFLOAT16 = "bfloat16"


def stored_logits(logits: torch.Tensor) -> StoredLogits:
    """The payload of `logits` [B, C] (as sent: float32 values)."""
    values = logits.detach().to(torch.float32).contiguous().cpu()  # [B, C]
    shape = ",".join(str(s) for s in values.shape)
    bits = values.view(torch.int32)
    if not bool((bits & 0xFFFF).any()):  # every value is a bf16 value: its high half is all of it
        return StoredLogits((bits >> 16).to(torch.int16).numpy().tobytes(), shape, BFLOAT16)
    return StoredLogits(values.numpy().tobytes(), shape)


def logits_of(data: bytes, shape: str, dtype: str | None) -> torch.Tensor:
    """The float32 logits a payload holds, shaped as stored."""
    dims = [int(s) for s in shape.split(",")]
    if dtype is None:
        return torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(dims)
    if dtype == BFLOAT16:
        halves = torch.frombuffer(bytearray(data), dtype=torch.int16)
        return (halves.to(torch.int32) << 16).view(torch.float32).reshape(dims)
    raise ValueError(f"replay payload of logits dtype {dtype!r}, which this server cannot read (a newer server's)")
