"""TeacherClient: the blocking gRPC client a student uses to get masked-teacher logits and what they cost.

>>> client = TeacherClient("teacher.example:50051", api_key)
>>> info = client.info()                                  # resolution, patch grid, price (cached)
>>> logits, usage = client.infer(images=x, keep_indices=keep)   # x: [B, C, H, W] in 0..1, keep: [B, K]

By default only the kept patches travel (uint8 when the pixels are exactly k/255, else float16). Every call carries a
request_id; a retry after UNAVAILABLE / DEADLINE_EXCEEDED reuses it, so the server answers a retried request from its
ledger and never bills it twice.
"""
from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
import torch

from maskedkd.v1 import teacher_pb2 as pb
from maskedkd.v1 import teacher_pb2_grpc as pb_grpc
from student_client.channel import open_channel
from student_client.errors import RETRYABLE_CODES, TeacherError, error_from_rpc
from student_client.tls import channel_credentials
from student_client.wire import (
    ModelInfo, Usage, batch_size_of, build_request, decode_response, new_request_id, split_rows,
)

T = TypeVar("T")
InferResult = tuple[torch.Tensor, Usage]


def backoff_delay(attempt: int, backoff_s: float) -> float:
    """Exponential backoff with +-25% jitter so that many workers do not retry in lockstep."""
    return backoff_s * (2 ** attempt) * random.uniform(0.75, 1.25)


def slice_rows(t: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if t is None else t[rows]


class TeacherClient:
    """Blocking client for `maskedkd.v1.TeacherService`; thread-safe (one channel, shared by threads)."""

    def __init__(
        self, target: str, api_key: str, *, timeout_s: float = 60.0, max_retries: int = 4, backoff: float = 0.25,
        max_message_mb: float = 64.0, model: str | None = None, tls: bool = False,
        root_certificates: bytes | None = None, interceptors: Sequence[grpc.UnaryUnaryClientInterceptor] = (),
        ca_file: str | None = None, client_cert: str | None = None, client_key: str | None = None,
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s      # deadline of one attempt
        self.max_retries = max_retries  # extra attempts after UNAVAILABLE / DEADLINE_EXCEEDED
        self.backoff = backoff          # first retry waits ~backoff seconds, then doubles
        self.max_message_mb = max_message_mb
        self.model = model              # None: the server's default model
        self._metadata = (("authorization", f"Bearer {api_key}"),)
        # one channel over one or many replicas (round-robin, health-checked): see student_client/channel.py;
        # TLS when asked for or when any TLS file is given (ca_file None: the system's root certificates)
        creds = channel_credentials(tls=tls, ca_file=ca_file, client_cert=client_cert, client_key=client_key,
                                    root_certificates=root_certificates)
        channel = open_channel(target, max_message_mb=max_message_mb, credentials=creds)
        self._raw_channel = channel
        self.channel = grpc.intercept_channel(channel, *interceptors) if interceptors else channel
        self.stub = pb_grpc.TeacherServiceStub(self.channel)
        self._info: ModelInfo | None = None
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    # ---- calls ----------------------------------------------------------------------------------------------
    def info(self, *, refresh: bool = False) -> ModelInfo:
        """The served model's description (cached after the first call)."""
        with self._lock:
            if self._info is None or refresh:
                msg = self._call(self.stub.GetModelInfo, pb.ModelInfoRequest(model=self.model or ""))
                self._info = ModelInfo.from_proto(msg)
            return self._info

    def infer(
        self, images: torch.Tensor | None = None, patches: torch.Tensor | None = None,
        keep_indices: torch.Tensor | None = None, keep_counts: torch.Tensor | None = None,
        request_id: str | None = None, *, send_patches: bool = True,
    ) -> InferResult:
        """Teacher logits [B, num_classes] float32 and the Usage billed.

        images: [B, C, H, W] un-normalized (uint8 or float 0..1), resized bilinearly to the teacher's resolution
        when it differs. patches: [B, K, C, P, P] already cut (then keep_indices is required). keep_indices: [B, K]
        row-major on the teacher's grid (None: all patches). keep_counts: [B] for ragged rows. A batch larger than
        the server's max_batch_images is split into requests `<request_id>.<i>`.
        """
        info = self.info()
        rid = request_id or new_request_id()
        n = batch_size_of(images, patches)
        parts = split_rows(n, info.max_batch_images)
        logits: list[torch.Tensor] = []
        usage = Usage()
        for i, rows in enumerate(parts):
            req = build_request(
                info, images=slice_rows(images, rows), patches=slice_rows(patches, rows),
                keep_indices=slice_rows(keep_indices, rows), keep_counts=slice_rows(keep_counts, rows),
                request_id=rid if len(parts) == 1 else f"{rid}.{i}", model=self.model, send_patches=send_patches,
            )
            part_logits, part_usage = decode_response(self._call(self.stub.Infer, req))
            logits.append(part_logits)
            usage = usage + part_usage
        return (logits[0] if len(logits) == 1 else torch.cat(logits)), usage

    def check_key(self) -> None:
        """Raise TeacherAuthError unless the server accepts the API key. Free: opens an InferStream with no
        requests (the server checks the key before reading any), so nothing runs and nothing is billed."""
        def drain_empty_stream(_request: None, **call: Any) -> None:
            for _ in self.stub.InferStream(iter(()), **call):
                pass

        self._call(drain_empty_stream, None)

    def submit(self, images: torch.Tensor | None = None, **kwargs: Any) -> Future[InferResult]:
        """`infer` on a background thread; the Future resolves to (logits, usage) or raises a TeacherError."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="teacher-client")
            pool = self._pool
        return pool.submit(self.infer, images, **kwargs)

    # ---- plumbing -------------------------------------------------------------------------------------------
    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def _call(self, method: Callable[..., T], request: Any) -> T:
        """One unary call with a deadline per attempt and backoff retries on UNAVAILABLE / DEADLINE_EXCEEDED."""
        attempt = 0
        while True:
            try:
                return method(request, timeout=self.timeout_s, metadata=self._metadata)
            except grpc.RpcError as err:
                if err.code() in RETRYABLE_CODES and attempt < self.max_retries:
                    time.sleep(backoff_delay(attempt, self.backoff))
                    attempt += 1
                    continue
                raise error_from_rpc(err, self.target, attempts=attempt + 1) from err

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self._raw_channel.close()

    def __enter__(self) -> TeacherClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["TeacherClient", "TeacherError", "InferResult", "ModelInfo", "Usage"]
