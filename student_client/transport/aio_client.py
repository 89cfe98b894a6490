"""AsyncTeacherClient: the asyncio twin of TeacherClient on grpc.aio (same requests, retry policy and errors).

>>> async with AsyncTeacherClient("127.0.0.1:50051", key) as client:
...     logits, usage = await client.infer(images=x, keep_indices=keep)
"""

from __future__ import annotations

import asyncio
from typing import Any, Unpack

import grpc

from maskedkd.v1 import teacher_pb2 as pb
from student_client.errors import TeacherError
from student_client.transport.client import ClientCore, ClientSettings, InferResult
from student_client.transport.outgoing import OutgoingRequest
from student_client.transport.resend import ResendPlan
from student_client.transport.wire import Batch, ModelInfo, arguments_of, decode_response, join_results


class AsyncTeacherClient(ClientCore):
    """Create inside a running event loop; close with `await client.close()` or `async with`. Takes the settings
    of `ClientCore`."""

    aio = True

    def __init__(self, target: str, api_key: str, **settings: Unpack[ClientSettings]) -> None:
        super().__init__(target, api_key, **settings)
        self._info_lock = asyncio.Lock()

    async def info(self, *, refresh: bool = False) -> ModelInfo:
        async with self._info_lock:
            if self._info is None or refresh:
                msg = await self._call(self.stub.GetModelInfo, pb.ModelInfoRequest(model=self.model or ""))
                self._info = ModelInfo.from_proto(msg)
            return self._info

    @arguments_of(Batch)
    async def infer(self, batch: Batch) -> InferResult:
        """Same contract as `TeacherClient.infer`; parts of a split batch run concurrently."""
        requests = list(batch.requests(await self.info(), self.model))
        responses = await asyncio.gather(*(self._infer_request(req) for req in requests))
        return join_results([decode_response(r) for r in responses])

    async def _infer_request(self, req: OutgoingRequest) -> pb.InferResponse:
        """As `TeacherClient.infer_request`: a refused replay goes on as `student_client.transport.resend` says."""
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
        for channel in self.channels:
            await channel.close()

    async def __aenter__(self) -> AsyncTeacherClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
