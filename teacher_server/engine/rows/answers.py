"""What a request is answered with: its logits and the extra outputs it asked for (`InferRequest.outputs`).

A micro-batch whose requests ask for extra outputs runs once with the union of what they ask
(`maskedkd.teacher_outputs.forward_with_outputs`, ragged rows padded and masked); each request then gets only its own
rows, its own keep width and its own outputs, cast to the dtype it asked for and encoded for the wire in the forward
thread. A batch in which nobody asks keeps the logits-only fast paths (bucketing, packing, compiled shapes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from maskedkd.codec import OUTPUT_FIELDS, proto_to_tensor, tensor_to_proto
from maskedkd.masked_teacher import MaskedTeacher
from maskedkd.teacher_outputs import OUTPUT_NAMES, ForwardOutputs, OutputChoice, available_outputs
from maskedkd.text import clip
from maskedkd.v1 import teacher_pb2 as pb
from teacher_server.errors import InvalidRequestError

OutputsDtype = Literal["float32", "served"]
_ATTENTION = {"cls_attention": "mean", "cls_attention_heads": "heads"}


@dataclass(frozen=True)
class OutputsRequest:
    """The extra outputs one request asked for, checked against the served teacher."""

    choice: OutputChoice = field(default_factory=OutputChoice)
    dtype: OutputsDtype = "float32"


NO_OUTPUTS = OutputsRequest()


@dataclass(frozen=True)
class Answer:
    """One request's answer from the forward thread."""

    logits: torch.Tensor  # [B, classes] float32 CPU
    outputs: pb.Outputs | None = None  # the extra outputs asked for, encoded; None: logits only


def joined_answer(parts: Sequence[Answer]) -> Answer:
    """One answer of `parts`' rows in order (a request run in chunks: split_requests.py); each part asked for the same
    outputs, and its tensors are joined along their first (image) dimension."""
    logits = torch.cat([a.logits for a in parts])  # [sum B, classes]
    if parts[0].outputs is None:
        return Answer(logits)
    out = pb.Outputs()
    for name in OUTPUT_FIELDS:
        if parts[0].outputs.HasField(name):
            joined = torch.cat([proto_to_tensor(getattr(a.outputs, name)) for a in parts])
            getattr(out, name).CopyFrom(tensor_to_proto(joined))
    return Answer(logits, out)


def answered_bytes(logits: torch.Tensor, outputs: pb.Outputs | None) -> int:
    """Bytes of the tensors answered (Usage.output_bytes): float32 logits plus the extra outputs."""
    extra = 0 if outputs is None else sum(len(getattr(outputs, n).data) for n in OUTPUT_FIELDS)
    return logits.numel() * 4 + extra


def decode_outputs(request: pb.InferRequest, teacher: MaskedTeacher) -> OutputsRequest:
    """InferRequest.outputs / outputs_dtype, checked; InvalidRequestError names what is wrong."""
    names = list(request.outputs)
    if request.outputs_dtype not in ("", "float32", "served"):
        raise InvalidRequestError(f"outputs_dtype: {clip(request.outputs_dtype)} is not one of float32, served")
    if not names:
        if request.outputs_dtype:
            raise InvalidRequestError("outputs_dtype is set but no outputs are asked for")
        return NO_OUTPUTS
    for name in names:
        if name not in OUTPUT_NAMES:
            raise InvalidRequestError(f"outputs: {clip(name)} is not an output; choose from {', '.join(OUTPUT_NAMES)}")
    if len(set(names)) != len(names):
        raise InvalidRequestError("outputs: each output may be asked for once")
    if "cls_attention" in names and "cls_attention_heads" in names:
        raise InvalidRequestError("outputs: ask for cls_attention or cls_attention_heads, not both")
    available = available_outputs(teacher)
    if missing := [n for n in names if n not in available]:
        why = "it merges tokens (ToMe)" if not available else "it has no class token"
        raise InvalidRequestError(f"outputs: the served model cannot give {', '.join(missing)}: {why}")
    attention = next((_ATTENTION[n] for n in names if n in _ATTENTION), "none")
    choice = OutputChoice("pre_logits" in names, "patch_tokens" in names, attention)  # type: ignore[arg-type]  # one of the Literal's values
    return OutputsRequest(choice, "served" if request.outputs_dtype == "served" else "float32")


def batch_choice(requests: Sequence[OutputsRequest]) -> OutputChoice:
    """What the batch's forward computes: everything any of its requests asks for."""
    choice = OutputChoice()
    for r in requests:
        choice = choice.union(r.choice)
    return choice


def job_outputs(
    batch: ForwardOutputs, rows: slice, k: int, asked: OutputsRequest, served_dtype: torch.dtype
) -> pb.Outputs | None:
    """One request's outputs from the batch's: its rows, its first `k` kept slots (the batch is as wide as its widest
    request), in the dtype it asked for."""
    if not asked.choice.any:
        return None
    dtype = served_dtype if asked.dtype == "served" else torch.float32
    out = pb.Outputs()

    def put(field: pb.Tensor, x: torch.Tensor) -> None:
        field.CopyFrom(tensor_to_proto(x.to(dtype).cpu().contiguous()))

    if asked.choice.pre_logits:
        assert batch.pre_logits is not None  # the batch's choice covers every request's
        put(out.pre_logits, batch.pre_logits[rows])  # [B,D]
    if asked.choice.patch_tokens:
        assert batch.patch_tokens is not None
        put(out.patch_tokens, batch.patch_tokens[rows, :k])  # [B,k,D]
    if asked.choice.attention != "none":
        assert batch.cls_attention is not None
        maps = batch.cls_attention[rows, ..., :k]  # [B,L,H,k] or [B,L,k] float32
        if asked.choice.attention == "mean" and maps.dim() == 4:
            maps = maps.mean(dim=2)  # [B,L,k]
        put(out.cls_attention, maps)
    return out
