"""TeacherService over gRPC: authenticate, hand the request to InferenceService, encode the answer. Errors are
raised as typed exceptions and mapped to statuses by the interceptor; in InferStream the same mapping makes a failed
message's own error answer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from grpc import aio

from maskedkd.codec import tensor_to_proto
from maskedkd.teacher_outputs import available_outputs
from maskedkd.v1 import teacher_pb2 as pb
from maskedkd.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.engine.rows.answers import answered_bytes
from teacher_server.errors import AuthenticationError, ServiceUnavailableError
from teacher_server.ledger.refusals import RefusalCounter
from teacher_server.metrics import ServerMetrics
from teacher_server.priorities import DEFAULT_PRIORITY
from teacher_server.service.accounting.auth import KeyAuthenticator, KeyInfo, bearer_secret
from teacher_server.service.accounting.biller import InferOutcome
from teacher_server.service.accounting.quota_status import limit_metadata
from teacher_server.service.error_interceptor import mark_counted, status_of
from teacher_server.service.inference import CURRENT_LABELS, CallLabels, InferenceService, current_labels
from teacher_server.service.wire.decoding import decoded, request_id_of
from teacher_server.service.wire.pixels_in_place import InferWithPixels
from teacher_server.settings import ServerSettings

STREAM_WINDOW = 64  # requests of one stream in flight at once (back-pressure on a fast sender)


@dataclass(frozen=True)
class _StreamEnd:
    """Last item of a stream's answer queue: queued only after every answer started before it."""

    error: BaseException | None  # what the stream then ends with; None: the client half-closed, all answered


async def _next_request(messages: AsyncIterator[Any], closing: asyncio.Future[Any]) -> Any:
    """The stream's next message, or how the stream ends: the client half-closed, its side broke, or the server is
    shutting down (then the message, if any, stays unread: the client resends it elsewhere)."""
    incoming = asyncio.ensure_future(anext(messages))
    await asyncio.wait({incoming, closing}, return_when=asyncio.FIRST_COMPLETED)
    if not incoming.done():
        incoming.cancel()
        return _StreamEnd(
            mark_counted(
                ServiceUnavailableError(
                    "the server is shutting down; requests not answered on this stream were not run: send them again "
                    "(same request_id)"
                )
            )
        )
    try:
        return incoming.result()
    except StopAsyncIteration:
        return _StreamEnd(None)
    except Exception as exc:  # noqa: BLE001 - the client's side of the stream broke
        return _StreamEnd(mark_counted(exc))


def deadline_of(context: aio.ServicerContext) -> float | None:
    """The call's gRPC deadline as a time.monotonic() (None: the client set none)."""
    left = context.time_remaining()
    return None if left is None else time.monotonic() + left


def to_response(outcome: InferOutcome) -> pb.InferResponse:
    u = outcome.usage
    return pb.InferResponse(
        request_id=outcome.request_id,
        logits=tensor_to_proto(outcome.logits),
        usage=pb.Usage(
            images=u.images,
            tokens=u.tokens,
            gflops=u.gflops,
            full_gflops=u.full_gflops,
            cost=u.cost,
            replayed=outcome.replayed,
            output_bytes=answered_bytes(outcome.logits, outcome.outputs),
        ),
        outputs=outcome.outputs,
    )


class TeacherServicer(pb_grpc.TeacherServiceServicer):
    def __init__(
        self,
        *,
        service: InferenceService,
        auth: KeyAuthenticator,
        settings: ServerSettings,
        metrics: ServerMetrics,
        refusals: RefusalCounter | None = None,
    ) -> None:
        self._service = service
        self._refusals = refusals or RefusalCounter()
        self._auth = auth
        self._settings = settings
        self._metrics = metrics
        self._closing = asyncio.Event()

    def close_streams(self) -> None:
        """Server shutdown: every InferStream stops reading, answers what it started, then ends UNAVAILABLE."""
        self._closing.set()

    async def _key(self, context: aio.ServicerContext) -> KeyInfo:
        key = await self._auth.authenticate(bearer_secret(context.invocation_metadata()))
        labels = current_labels()
        labels.key, labels.key_id = key.name, key.id
        return key

    async def GetModelInfo(self, request: pb.ModelInfoRequest, context: aio.ServicerContext) -> pb.ModelInfo:
        served = self._service.served.named(request.model)
        price = self._settings.price_per_gflop
        key: KeyInfo | None = None
        try:  # a key is optional here; with one, the price shown and the queue wait are the key's own
            key = await self._key(context)
            price = key.price_per_gflop if key.price_per_gflop is not None else price
        except AuthenticationError:
            pass
        await context.send_initial_metadata(self._queue_wait(key))
        return pb.ModelInfo(
            model=served.name,
            **served.teacher.geometry.proto_fields(),
            full_gflops=served.meter.full_image_gflops,
            price_per_gflop=price,
            currency=self._settings.currency,
            models=[served.name],
            max_batch_images=served.batcher.max_batch_images,
            dtype=served.dtype_name,
            outputs=available_outputs(served.teacher),
            tome_r=getattr(served.teacher, "r", 0),
            shared_memory=self._settings.shared_memory,
        )

    async def Infer(self, request: pb.InferRequest | InferWithPixels, context: aio.ServicerContext) -> pb.InferResponse:
        key = await self._key(context)
        outcome = await self._service.infer(key, request, deadline=deadline_of(context), peer=context.peer())
        # x-ratelimit-* / x-quota-* (quota_status.py), and the wait a next request of the key would have now
        await context.send_initial_metadata((*limit_metadata(outcome.limits), *self._queue_wait(key)))
        with self._metrics.stage("encode"):
            return to_response(outcome)

    def _queue_wait(self, key: KeyInfo | None) -> tuple[tuple[str, str], ...]:
        """`x-queue-wait-s`: the server's estimate, in seconds, of how long a request of `key` (None: an anonymous
        standard-priority one) sent now would take before its answer: work queued ahead of it, plus its forward."""
        batcher = self._service.served.batcher
        if key is None:
            wait = batcher.expected_wait_s(-1, DEFAULT_PRIORITY, 0, 1.0)
        else:
            wait = batcher.expected_wait_s(key.id, key.priority, 0, key.weight)
        return (("x-queue-wait-s", f"{wait:.3f}"),)

    async def InferStream(
        self, request_iterator: AsyncIterator[Any], context: aio.ServicerContext
    ) -> AsyncIterator[pb.InferResponse]:
        # One answer per message, an error answer for a failed one (keyed by its request_id); the stream goes on.
        # Where it must end (server shutting down, the client's side broke), it ends only after every message
        # already started was answered: nothing billed is left unsent.
        key = await self._key(context)  # refuse a bad key before reading anything
        if metadata := limit_metadata(await self._service.limit_metadata(key)):  # the state as the stream starts
            await context.send_initial_metadata(metadata)
        answers: asyncio.Queue[pb.InferResponse | _StreamEnd] = asyncio.Queue()
        window = asyncio.Semaphore(STREAM_WINDOW)
        started: set[asyncio.Task[None]] = set()

        async def answer(request: Any) -> None:
            try:
                await answers.put(await self._answer(request, context))
            finally:
                window.release()

        async def read() -> _StreamEnd:
            """Start an answer per message until the client half-closes or the stream must end."""
            messages = aiter(request_iterator)
            closing = asyncio.ensure_future(self._closing.wait())
            try:
                while True:
                    await window.acquire()
                    request = await _next_request(messages, closing)
                    if isinstance(request, _StreamEnd):
                        window.release()
                        return request
                    task = asyncio.create_task(answer(request))
                    started.add(task)
                    task.add_done_callback(started.discard)
            finally:
                closing.cancel()

        async def read_then_end() -> None:
            try:
                end = await read()
                await asyncio.gather(*started, return_exceptions=True)
            except asyncio.CancelledError:  # the client cancelled: its answers cannot be sent any more
                for task in started:
                    task.cancel()
                raise
            await answers.put(end)

        reader = asyncio.create_task(read_then_end())
        try:
            while not isinstance(item := await answers.get(), _StreamEnd):
                yield item
            if item.error is not None:
                raise item.error
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def _answer(self, request: Any, context: aio.ServicerContext) -> pb.InferResponse:
        """One stream message's answer, or its error answer (counted per message, as a unary call would be)."""
        labels = CallLabels()
        CURRENT_LABELS.set(labels)  # this task's own copy of the context
        try:
            key = await self._key(context)  # cached; a key disabled mid-stream stops being served
            outcome = await self._service.infer(
                key, decoded(request), deadline=deadline_of(context), peer=context.peer()
            )
            with self._metrics.stage("encode"):
                response = to_response(outcome)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - this message alone fails: its own error answer, the stream goes on
            code, message = status_of(exc)
            self._metrics.count_request(model=labels.model, key=labels.key, code=code.name)
            self._refusals.count(exc, key_id=labels.key_id)
            return pb.InferResponse(
                request_id=request_id_of(request), error=pb.Status(code=code.value[0], message=message)
            )
        self._metrics.count_request(model=labels.model, key=labels.key, code="OK")
        return response
