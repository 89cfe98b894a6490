"""The content digest binding a request_id to its inputs: sha256 over everything that determines the answer (model,
input kind, and dtype, shape and bytes of the input, keep indices and keep counts). Computed from the request's
fields as sent, before any decoding, so it is cheap (hashlib over the bytes) and the same on every server.

`purpose` is left out on purpose: it does not change the answer, so a retry under another label is a replay of what
was billed (and stays counted under the label it was billed with), not a refusal."""

from __future__ import annotations

import hashlib

from maskedkd.v1 import teacher_pb2 as pb


def _tensor(h: hashlib._Hash, name: str, present: bool, tensor: pb.Tensor) -> None:
    h.update(
        f"{name}:{int(present)}:{tensor.dtype}:{','.join(str(d) for d in tensor.shape)}:{len(tensor.data)}:".encode()
    )
    h.update(tensor.data)


def content_digest(request: pb.InferRequest, *, model: str) -> str:
    """sha256 hex of (served model name, images|patches, input tensor, keep_indices, keep_counts)."""
    kind = request.WhichOneof("input") or ""
    h = hashlib.sha256()
    h.update(f"maskedkd-v1:{len(model)}:{model}:{kind}:".encode())
    _tensor(h, "input", bool(kind), getattr(request, kind) if kind else pb.Tensor())
    _tensor(h, "keep_indices", request.HasField("keep_indices"), request.keep_indices)
    _tensor(h, "keep_counts", request.HasField("keep_counts"), request.keep_counts)
    return h.hexdigest()
