"""TeacherService over gRPC: authenticate, hand the request to InferenceService, encode the answer. Errors are
raised as typed exceptions and mapped to statuses by the interceptor."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from grpc import aio

from maskedkd.codec import tensor_to_proto
from maskedkd.v1 import teacher_pb2 as pb
from maskedkd.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.auth import KeyAuthenticator, KeyInfo, bearer_secret
from teacher_server.errors import AuthenticationError, ServiceError
from teacher_server.inference import CURRENT_LABELS, CallLabels, InferenceService, InferOutcome, current_labels
from teacher_server.interceptor import mark_counted
from teacher_server.metrics import ServerMetrics
from teacher_server.quota_status import limit_metadata
from teacher_server.settings import ServerSettings

STREAM_WINDOW = 64  # requests of one stream in flight at once (back-pressure on a fast sender)


class StreamRequestError(ServiceError):
    """A failed message of an InferStream: ends the stream with the message's status, naming its request_id."""

    def __init__(self, request_id: str, cause: ServiceError) -> None:
        super().__init__(f"request_id {request_id!r}: {cause}" if request_id else str(cause))
        self.status = cause.status


def to_response(outcome: InferOutcome) -> pb.InferResponse:
    u = outcome.usage
    return pb.InferResponse(
        request_id=outcome.request_id, logits=tensor_to_proto(outcome.logits),
        usage=pb.Usage(images=u.images, tokens=u.tokens, gflops=u.gflops, full_gflops=u.full_gflops, cost=u.cost,
                       replayed=outcome.replayed),
    )


class TeacherServicer(pb_grpc.TeacherServiceServicer):
    def __init__(self, *, service: InferenceService, auth: KeyAuthenticator, settings: ServerSettings,
                 metrics: ServerMetrics) -> None:
        self._service = service
        self._auth = auth
        self._settings = settings
        self._metrics = metrics

    async def _key(self, context: aio.ServicerContext) -> KeyInfo:
        key = await self._auth.authenticate(bearer_secret(context.invocation_metadata()))
        current_labels().key = key.name
        return key

    async def GetModelInfo(self, request: pb.ModelInfoRequest, context: aio.ServicerContext) -> pb.ModelInfo:
        served = self._service.registry.get(request.model)
        price = self._settings.price_per_gflop
        try:  # a key is optional here; with one, the price shown is the key's own
            key = await self._key(context)
            price = key.price_per_gflop if key.price_per_gflop is not None else price
        except AuthenticationError:
            pass
        s = served.spec
        return pb.ModelInfo(
            model=s.name, image_height=s.img_size[0], image_width=s.img_size[1], patch_size=s.patch_size,
            grid_height=s.grid_size[0], grid_width=s.grid_size[1], num_prefix_tokens=s.num_prefix_tokens,
            num_classes=s.num_classes, in_chans=s.in_chans, mean=list(s.mean), std=list(s.std),
            full_gflops=served.meter.full_image_gflops, price_per_gflop=price, currency=self._settings.currency,
            models=self._service.registry.names, max_batch_images=served.batcher.max_batch_images,
            dtype=served.dtype_name,
        )

    async def Infer(self, request: pb.InferRequest, context: aio.ServicerContext) -> pb.InferResponse:
        key = await self._key(context)
        outcome = await self._service.infer(key, request)
        if metadata := limit_metadata(outcome.limits):  # x-ratelimit-* / x-quota-*: quota_status.py
            await context.send_initial_metadata(metadata)
        return to_response(outcome)

    async def InferStream(self, request_iterator: AsyncIterator[pb.InferRequest],
                          context: aio.ServicerContext) -> AsyncIterator[pb.InferResponse]:
        key = await self._key(context)  # refuse a bad key before reading anything
        if metadata := limit_metadata(await self._service.limit_metadata(key)):  # the state as the stream starts
            await context.send_initial_metadata(metadata)
        responses: asyncio.Queue[pb.InferResponse | BaseException | None] = asyncio.Queue()
        window = asyncio.Semaphore(STREAM_WINDOW)

        async def answer(request: pb.InferRequest) -> None:
            labels = CallLabels()
            CURRENT_LABELS.set(labels)  # this task's own copy of the context
            try:
                key = await self._key(context)  # cached; a key disabled mid-stream stops being served
                response = to_response(await self._service.infer(key, request))
                self._metrics.count_request(model=labels.model, key=labels.key, code="OK")
                await responses.put(response)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                code = exc.status if isinstance(exc, ServiceError) else "INTERNAL"
                self._metrics.count_request(model=labels.model, key=labels.key, code=code)
                if isinstance(exc, ServiceError):
                    exc = StreamRequestError(request.request_id, exc)
                await responses.put(mark_counted(exc))
            finally:
                window.release()

        async def read() -> None:
            tasks: list[asyncio.Task[None]] = []
            try:
                async for request in request_iterator:
                    await window.acquire()
                    tasks.append(asyncio.create_task(answer(request)))
                    tasks = [t for t in tasks if not t.done()]
                await asyncio.gather(*tasks)
                await responses.put(None)
            except asyncio.CancelledError:
                for t in tasks:
                    t.cancel()
                raise
            except Exception as exc:  # the client's stream broke
                await responses.put(exc)

        reader = asyncio.create_task(read())
        try:
            while (item := await responses.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
