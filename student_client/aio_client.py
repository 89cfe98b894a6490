"""AsyncTeacherClient: the asyncio twin of TeacherClient on grpc.aio (same requests, retry policy and errors).

>>> async with AsyncTeacherClient("127.0.0.1:50051", key) as client:
...     logits, usage = await client.infer(images=x, keep_indices=keep)
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import torch

from maskedkd.v1 import teacher_pb2 as pb
from maskedkd.v1 import teacher_pb2_grpc as pb_grpc
from student_client.channel import open_channel
from student_client.client import InferResult, slice_rows
from student_client.errors import TeacherError
from student_client.resend import CountsRefusedReplays, RefusedReplays, ResendPlan
from student_client.retry import DEFAULT_PATIENCE_S, RetryPolicy
from student_client.tls import channel_credentials
from student_client.wire import (
    ModelInfo,
    Usage,
    batch_size_of,
    build_request,
    decode_response,
    new_request_id,
    split_rows,
)


class AsyncTeacherClient(CountsRefusedReplays):
    """Create inside a running event loop; close with `await client.close()` or `async with`."""

    def __init__(
        self,
        target: str,
        api_key: str,
        *,
        timeout_s: float = 60.0,
        max_retries: int = 4,
        backoff: float = 0.25,
        max_message_mb: float = 64.0,
        model: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        patience_s: float = DEFAULT_PATIENCE_S,
        ca_file: str | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
        reuse_billed_answers: bool = False,
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff = backoff
        self.refused_replays = RefusedReplays()  # re-sent ids the teacher could not replay (resend.py)
        self.reuse_billed_answers = reuse_billed_answers  # see student_client/resend.py
        self.retry = RetryPolicy(
            target, timeout_s=timeout_s, patience_s=patience_s, min_retries=max_retries, backoff_s=backoff
        )
        self.model = model
        self._metadata = (("authorization", f"Bearer {api_key}"),)
        creds = channel_credentials(
            tls=tls,
            ca_file=ca_file,
            client_cert=client_cert,
            client_key=client_key,
            root_certificates=root_certificates,
        )
        self.channel = open_channel(target, max_message_mb=max_message_mb, credentials=creds, aio=True)
        self.stub = pb_grpc.TeacherServiceStub(self.channel)
        self._info: ModelInfo | None = None
        self._info_lock = asyncio.Lock()

    async def info(self, *, refresh: bool = False) -> ModelInfo:
        async with self._info_lock:
            if self._info is None or refresh:
                msg = await self._call(self.stub.GetModelInfo, pb.ModelInfoRequest(model=self.model or ""))
                self._info = ModelInfo.from_proto(msg)
            return self._info

    async def infer(
        self,
        images: torch.Tensor | None = None,
        patches: torch.Tensor | None = None,
        keep_indices: torch.Tensor | None = None,
        keep_counts: torch.Tensor | None = None,
        request_id: str | None = None,
        *,
        send_patches: bool = True,
        purpose: str = "",
    ) -> InferResult:
        """Same contract as `TeacherClient.infer`; parts of a split batch run concurrently."""
        info = await self.info()
        rid = request_id or new_request_id()
        parts = split_rows(batch_size_of(images, patches), info.max_batch_images)
        requests = [
            build_request(
                info,
                images=slice_rows(images, rows),
                patches=slice_rows(patches, rows),
                keep_indices=slice_rows(keep_indices, rows),
                keep_counts=slice_rows(keep_counts, rows),
                request_id=rid if len(parts) == 1 else f"{rid}.{i}",
                model=self.model,
                send_patches=send_patches,
                purpose=purpose,
            )
            for i, rows in enumerate(parts)
        ]
        responses = await asyncio.gather(*(self._infer_request(req) for req in requests))
        decoded = [decode_response(r) for r in responses]
        usage = Usage()
        for _, u in decoded:
            usage = usage + u
        logits = decoded[0][0] if len(decoded) == 1 else torch.cat([lg for lg, _ in decoded])
        return logits, usage

    async def _infer_request(self, req: pb.InferRequest) -> pb.InferResponse:
        """As `TeacherClient.infer_request`: a refused replay goes on as `student_client.resend` says."""
        plan = ResendPlan(req, self.reuse_billed_answers)
        while True:
            try:
                return await self._call(self.stub.Infer, req)
            except TeacherError as err:
                if (step := plan.after(err)) is None:
                    raise
                self.refused_replays.note(plan, step, str(err))

    async def _call(self, method: Any, request: Any) -> Any:
        attempts = self.retry.start()
        while True:
            try:
                result = await method(
                    request, timeout=attempts.timeout(), metadata=self._metadata, wait_for_ready=attempts.waiting
                )
            except grpc.aio.AioRpcError as err:
                await asyncio.sleep(attempts.failed(err))
                continue
            attempts.succeeded()
            return result

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncTeacherClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
