"""The one place exceptions become gRPC statuses: typed `ServiceError`s keep their message, anything else becomes
INTERNAL with a reference id (the trace goes to the server log, never to the client). Also counts inference
requests that end in an error (`maskedkd_requests_total{code}`); successes are counted where they complete.
Request bytes that do not parse reach the service as `UndecodableRequest` markers (INVALID_ARGUMENT), not as
grpc's UNKNOWN."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from maskedkd.v1 import teacher_pb2 as pb
from teacher_server.errors import ServiceError
from teacher_server.ledger.refusals import RefusalCounter
from teacher_server.metrics import ServerMetrics
from teacher_server.service.inference import CURRENT_LABELS, CallLabels
from teacher_server.service.wire.decoding import decoded, tolerant
from teacher_server.service.wire.pixels_in_place import deserialize_infer_request

log = logging.getLogger(__name__)

SERVICE_PREFIX = "/maskedkd.v1.TeacherService/"
INFERENCE_METHODS = ("Infer", "InferStream")
MAX_MESSAGE_CHARS = 300  # a status message is one short line; longer ones are a bug (an unclipped echo), cut here
CUT_MARK = " [cut]"
_METHODS = pb.DESCRIPTOR.services_by_name["TeacherService"].methods_by_name


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(code, client-facing message) for an exception."""
    if isinstance(exc, ServiceError):
        message = str(exc)
        if len(message) > MAX_MESSAGE_CHARS:
            log.warning("status message of %d characters cut: %s", len(message), message[:1000])
            message = message[: MAX_MESSAGE_CHARS - len(CUT_MARK)] + CUT_MARK
        return grpc.StatusCode[exc.status], message
    ref = uuid.uuid4().hex[:12]
    log.error("internal error (ref %s)", ref, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal server error (ref {ref}); the request was not billed"


def rich_trailing_metadata(
    exc: BaseException, code: grpc.StatusCode, message: str
) -> tuple[tuple[str, str | bytes], ...]:
    """Trailing metadata of an error: the google.rpc Status with the error's `details` (QuotaFailure, RetryInfo)
    when it has some, and its own `trailing_metadata` (the x-ratelimit-* / x-quota-* state)."""
    metadata: list[tuple[str, str | bytes]] = list(getattr(exc, "trailing_metadata", ()))
    details = getattr(exc, "details", ())
    if details:
        from google.protobuf import any_pb2
        from google.rpc import status_pb2

        packed = []
        for detail in details:
            any_detail = any_pb2.Any()
            any_detail.Pack(detail)
            packed.append(any_detail)
        status = status_pb2.Status(code=code.value[0], message=message, details=packed)
        metadata.append(("grpc-status-details-bin", status.SerializeToString()))
    return tuple(metadata)


def mark_counted(exc: BaseException) -> BaseException:
    """Tell the interceptor not to count this error as a request (a stream's end: its messages count apart)."""
    exc.maskedkd_counted = True  # type: ignore[attr-defined]  # a marker on the exception object itself
    return exc


class ServiceInterceptor(aio.ServerInterceptor):
    """An interceptor of TeacherService's calls only: their handlers go through `wrap`; health, reflection and the
    calls of other services pass untouched."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not method.startswith(SERVICE_PREFIX):
            return handler
        return self.wrap(method.removeprefix(SERVICE_PREFIX), handler)

    def wrap(self, name: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The handler to call for the TeacherService method `name` (e.g. "Infer") instead of `handler`."""
        raise NotImplementedError


class ErrorInterceptor(ServiceInterceptor):
    """Also tracks the TeacherService calls in flight, so shutdown can wait for exactly those (not for health
    watchers or reflection streams)."""

    def __init__(self, metrics: ServerMetrics, refusals: RefusalCounter | None = None) -> None:
        self._metrics = metrics
        self._refusals = refusals or RefusalCounter()
        self._in_flight = 0
        self._idle: asyncio.Event | None = None

    def _enter(self) -> None:
        self._in_flight += 1
        if self._idle is not None:
            self._idle.clear()

    def _leave(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no TeacherService call is in flight (True) or `timeout` passed (False)."""
        if self._idle is None:
            self._idle = asyncio.Event()
        if self._in_flight == 0:
            return True
        self._idle.clear()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    def wrap(self, name: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        counts = name in INFERENCE_METHODS
        deserializer = handler.request_deserializer
        if name in _METHODS and deserializer is not None:
            message_type = _METHODS[name].input_type
            if message_type is pb.InferRequest.DESCRIPTOR:  # its pixels stay where they arrived (pixels_in_place.py)
                deserializer = deserialize_infer_request
            deserializer = self._metrics.timed("receive", tolerant(deserializer, message_type))
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, counts),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_stream(handler.stream_stream, counts),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    async def _fail(self, exc: Exception, context: aio.ServicerContext, labels: CallLabels, counts: bool) -> None:
        code, message = status_of(exc)
        if counts and not getattr(exc, "maskedkd_counted", False):
            self._metrics.count_request(model=labels.model, key=labels.key, code=code.name)
            self._refusals.count(exc, key_id=labels.key_id)
        await context.abort(code, message, trailing_metadata=rich_trailing_metadata(exc, code, message))

    def _wrap_unary(self, behavior: Callable[..., Awaitable[Any]], counts: bool) -> Callable[..., Awaitable[Any]]:
        async def unary(request: Any, context: aio.ServicerContext) -> Any:
            labels = CallLabels()
            CURRENT_LABELS.set(labels)
            self._enter()
            try:
                response = await behavior(decoded(request), context)
            except (aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as exc:
                await self._fail(exc, context, labels, counts)
                raise  # unreachable: abort raises
            finally:
                self._leave()
            if counts:
                self._metrics.count_request(model=labels.model, key=labels.key, code="OK")
            return response

        return unary

    def _wrap_stream(
        self, behavior: Callable[..., AsyncIterator[Any]], counts: bool
    ) -> Callable[..., AsyncIterator[Any]]:
        async def stream(request_iterator: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
            labels = CallLabels()
            CURRENT_LABELS.set(labels)
            self._enter()
            try:
                async for response in behavior(request_iterator, context):
                    yield response
            except (aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as exc:
                await self._fail(exc, context, labels, counts)
                raise
            finally:
                self._leave()

        return stream
