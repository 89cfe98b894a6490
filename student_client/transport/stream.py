"""A streaming session over `InferStream`: submit batches without waiting, responses matched by request_id.

>>> with TeacherStream(client) as stream:
...     fut = stream.submit(images=x, keep_indices=keep)   # returns at once
...     ...                                                # the student keeps computing
...     logits, usage = fut.result()

`TeacherStreams(client)` keeps one such stream on each of the client's connections (`TeacherClient(connections=N)`)
and gives each batch to the one with the fewest answers outstanding: one connection is served by one process of a
teacher with `--ingest-workers`, so one stream would cap a trainer at what one process ingests.

When the stream breaks with UNAVAILABLE / DEADLINE_EXCEEDED, it is reopened under the client's retry policy (backoff,
then waiting for the channel to connect, for up to the client's patience) and every unanswered request is sent again
with the same request_id: the server answers those it already ran from its ledger, unbilled.
A request the teacher refuses alone fails only its own future with the mapped TeacherError (after resends under the
same request_id, per the same policy, when the status is transient); the stream goes on. A request refused with
ALREADY_EXISTS or FAILED_PRECONDITION (an id the teacher cannot replay: billed before for other content, or its stored
answer expired) goes as a unary call, which re-sends it under a derived id (`TeacherClient.infer_request`).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grpc

from maskedkd.torch_threads import helper_pool
from maskedkd.v1 import teacher_pb2 as pb
from student_client.errors import TeacherError, TeacherInputError
from student_client.transport.client import InferResult, TeacherClient
from student_client.transport.off_thread import DeviceMark, after, mark_after_caller
from student_client.transport.outgoing import OutgoingRequest
from student_client.transport.resend import REPLAY_REFUSED
from student_client.transport.retry import Attempts
from student_client.transport.wire import Batch, arguments_of, batch_size_of, decode_response

_CLOSE = object()  # ends the request iterator of one stream
_CODES = {code.value[0]: code for code in grpc.StatusCode}


class _MessageError(grpc.RpcError):
    """The error answer of one stream message, seen as the RpcError a unary Infer of it would have raised."""

    def __init__(self, response: pb.InferResponse) -> None:
        self._code = _CODES.get(response.error.code, grpc.StatusCode.UNKNOWN)
        self._details = f"request_id {response.request_id!r}: {response.error.message}"

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class _ClosedEarly(grpc.RpcError):
    """The server ended the stream cleanly with requests unanswered: retried like UNAVAILABLE."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "the stream ended with requests unanswered"


class TeacherStream:
    """One bidirectional stream per session, on one of the client's connections (reopened on the same one);
    thread-safe `submit`. Uses the client's channel, key and settings."""

    def __init__(self, client: TeacherClient, *, connection: int = 0) -> None:
        if not 0 <= connection < client.connections:
            raise ValueError(f"connection must be in 0..{client.connections - 1}, got {connection}")
        self.client = client
        self.connection = connection
        self.info = client.info()
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[OutgoingRequest, Future[InferResult]]] = {}
        self._outbox: queue.Queue[Any] | None = None
        self._reader: threading.Thread | None = None
        self._closed = False
        self._attempts: Attempts | None = None  # retry state while the stream keeps breaking without answers
        self._retries: dict[str, Attempts] = {}  # request_id -> retry state after a transient per-message error
        self._encoder: ThreadPoolExecutor | None = None  # builds and queues the submitted batches, in order
        self._building: dict[Future[InferResult], str | None] = {}  # future -> the caller's request_id, while built

    @arguments_of(Batch)
    def submit(self, batch: Batch) -> Future[InferResult]:
        """Queue one batch (same arguments as `TeacherClient.infer`); the Future gives (logits, usage)."""
        return self.submit_batch(batch)

    def submit_batch(self, batch: Batch) -> Future[InferResult]:
        """`submit` of a built `Batch`: checked here, built and sent by this stream's encoder thread (off the
        caller's thread; on CUDA right after the caller's work queued so far, off_thread.py)."""
        fut: Future[InferResult] = Future()
        info = self.info
        n = batch_size_of(batch.images, batch.patches)
        if info.max_batch_images and n > info.max_batch_images:
            fut.set_exception(
                TeacherInputError(
                    f"batch of {n} images exceeds the teacher's max_batch_images={info.max_batch_images}; "
                    "split it or use TeacherClient.infer"
                )
            )
            return fut
        rid = batch.request_id
        with self._lock:
            if self._closed:
                raise RuntimeError("TeacherStream is closed")
            if rid is not None and (rid in self._pending or rid in self._building.values()):
                raise ValueError(f"request_id {rid!r} is already in flight on this stream")
            self._building[fut] = rid
            if self._encoder is None:
                self._encoder = helper_pool(1, "teacher-stream-encode")
            encoder = self._encoder
        mark = mark_after_caller(batch.images, batch.patches, batch.keep_indices)
        encoder.submit(self._build_and_send, batch, fut, mark)
        return fut

    def _build_and_send(self, batch: Batch, fut: Future[InferResult], mark: DeviceMark | None) -> None:
        """Encoder thread: the batch's request built and queued on the stream (or its error on `fut`)."""
        try:
            with after(mark):
                req = next(batch.requests(self.info, self.client.model))  # one request: the batch fits
            rid = req.request_id
            with self._lock:
                if self._closed:
                    raise RuntimeError("TeacherStream is closed")
                if rid in self._pending:  # an id made here cannot repeat; one the caller gave was checked
                    raise ValueError(f"request_id {rid!r} is already in flight on this stream")
                self.client.log_request(req)
                sent, release = self.client.shared_request(req)  # pixels in shared memory until the answer is in
                fut.add_done_callback(lambda _: release())
                self._ensure_open_locked()  # (re)opening sends what is pending; this request goes once, below
                self._building.pop(fut, None)  # counted once in in_flight: pending from here
                self._pending[rid] = (sent, fut)
                assert self._outbox is not None
                self._outbox.put(sent)
        except Exception as err:  # noqa: BLE001 - the caller's future carries it (TeacherError for bad input)
            if not fut.done():  # unless the caller cancelled it meanwhile
                fut.set_exception(err)
        finally:
            with self._lock:
                self._building.pop(fut, None)

    @property
    def in_flight(self) -> int:
        """Requests submitted and not answered yet (those still being built included)."""
        with self._lock:
            return len(self._pending) + len(self._building)

    # ---- stream lifecycle -----------------------------------------------------------------------------------
    def _ensure_open_locked(self) -> None:
        if self._reader is not None and self._reader.is_alive() and self._outbox is not None:
            return
        self._outbox = queue.Queue()
        for req, _ in self._pending.values():  # resend what was never answered (same request_ids: no double bill)
            self._outbox.put(req)
        outbox = self._outbox
        call = self.client.stub_at(self.connection).InferStream(self._requests(outbox), metadata=self.client.metadata)
        self._reader = threading.Thread(
            target=self._read, args=(call, outbox), daemon=True, name="teacher-stream-reader"
        )
        self._reader.start()

    @staticmethod
    def _requests(outbox: queue.Queue[Any]):
        while True:
            item = outbox.get()
            if item is _CLOSE:
                return
            yield item

    def _read(self, call: Any, outbox: queue.Queue[Any]) -> None:
        try:
            for resp in call:
                result = None if resp.HasField("error") else decode_response(resp)
                with self._lock:
                    attempts, self._attempts = self._attempts, None
                    entry = self._pending.pop(resp.request_id, None)
                    resent = self._retries.pop(resp.request_id, None)
                if attempts is not None:
                    attempts.succeeded()
                if entry is not None and not entry[1].done():
                    if result is None:  # this request alone failed; the stream goes on
                        self._on_message_error(resp, *entry, resent=resent)
                    else:
                        entry[1].set_result(result)
            self._on_stream_end(None, outbox)
        except grpc.RpcError as err:
            self._on_stream_end(err, outbox)
        except Exception as err:  # noqa: BLE001 - a decode error: fail everything in flight with it
            self._fail_all(TeacherError(f"teacher at {self.client.target} sent a bad response: {err}"))

    def _on_message_error(
        self, resp: pb.InferResponse, req: OutgoingRequest, fut: Future[InferResult], *, resent: Attempts | None
    ) -> None:
        """Resend a request refused with a transient status (same request_id, per the retry policy), else fail it."""
        err = _MessageError(resp)
        if err.code().name in REPLAY_REFUSED:
            self._resolve_unary(req, fut)
            return
        attempts = resent or self.client.retry.start()
        try:
            delay = attempts.failed(err)
        except TeacherError as error:
            fut.set_exception(error)
            return
        with self._lock:
            self._retries[req.request_id] = attempts
            self._pending[req.request_id] = (req, fut)  # pending again: close() waits for it, a reopen resends it
        timer = threading.Timer(delay, self._resend, args=(req,))
        timer.daemon = True
        timer.start()

    def _resend(self, req: OutgoingRequest) -> None:
        with self._lock:
            if self._closed or req.request_id not in self._pending:
                return
            self._ensure_open_locked()
            assert self._outbox is not None
            self._outbox.put(req)

    def _on_stream_end(self, err: grpc.RpcError | None, outbox: queue.Queue[Any]) -> None:
        with self._lock:
            if not self._pending or (self._closed and err is None):
                return
            if self._attempts is None:
                self._attempts = self.client.retry.start()
            attempts = self._attempts
        if err is not None and err.code().name in REPLAY_REFUSED:
            self._resend_unary(outbox)
            return
        try:
            delay = attempts.failed(err if err is not None else _ClosedEarly())
            attempts.sleep(delay)
            # wait for the teacher to accept connections again, within the patience left
            ready = grpc.channel_ready_future(self.client.raw_channel_at(self.connection))
            ready.result(timeout=max(attempts.patience_left(), 0.1))
        except TeacherError as error:
            self._fail_all(error)
            return
        except grpc.FutureTimeoutError:
            self._fail_all(
                TeacherError(
                    f"teacher at {self.client.target} is unavailable: it did not come back "
                    f"within {self.client.patience_s:.0f}s",
                    code="UNAVAILABLE",
                )
            )
            return
        with self._lock:
            outbox.put(_CLOSE)
            self._reader = None
            if self._pending and not self._closed:
                self._ensure_open_locked()

    def _resend_unary(self, outbox: queue.Queue[Any]) -> None:
        """Answer every unanswered request through unary calls (each refused id is re-sent under a derived id)."""
        with self._lock:
            pending, self._pending = self._pending, {}
            outbox.put(_CLOSE)
            self._outbox, self._reader, self._attempts = None, None, None

        for req, fut in pending.values():
            self._resolve_unary(req, fut)

    def _resolve_unary(self, req: OutgoingRequest, fut: Future[InferResult]) -> None:
        """Answer one request with a unary call on its own thread (a refused id goes again under a derived id)."""

        def resolve() -> None:
            try:
                fut.set_result(decode_response(self.client.infer_request(req)))
            except Exception as error:  # noqa: BLE001 - handed to the waiting step
                fut.set_exception(error)

        threading.Thread(target=resolve, daemon=True, name="teacher-stream-unary").start()

    def _fail_all(self, error: TeacherError) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
            if self._outbox is not None:
                self._outbox.put(_CLOSE)
            self._outbox, self._reader, self._attempts = None, None, None
            self._retries.clear()
        for _, fut in pending.values():
            if not fut.done():
                fut.set_exception(error)

    def close(self, timeout_s: float | None = None) -> None:
        """Wait up to `timeout_s` for answers in flight, then end the stream."""
        deadline = time.monotonic() + (self.client.timeout_s if timeout_s is None else timeout_s)
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._lock:
            self._closed = True
            if self._outbox is not None:
                self._outbox.put(_CLOSE)
            reader = self._reader
            encoder, self._encoder = self._encoder, None
        if encoder is not None:  # batches still being built fail with "closed"
            encoder.shutdown(wait=True)
        if reader is not None:
            reader.join(timeout=max(0.0, deadline - time.monotonic()) + 1.0)
        if self.in_flight:
            self._fail_all(TeacherError("stream closed with requests unanswered"))

    def __enter__(self) -> TeacherStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TeacherStreams:
    """A `TeacherStream` on each of the client's connections; `submit` goes to the one with the fewest answers
    outstanding (taking turns among equals). A request stays on its stream: its resends keep its request_id there."""

    def __init__(self, client: TeacherClient) -> None:
        self.client = client
        self.info = client.info()
        self.streams = [TeacherStream(client, connection=i) for i in range(client.connections)]
        self._turn = itertools.count()

    @arguments_of(Batch)
    def submit(self, batch: Batch) -> Future[InferResult]:
        """Queue one batch (same arguments as `TeacherClient.infer`); the Future gives (logits, usage)."""
        start = next(self._turn) % len(self.streams)
        order = self.streams[start:] + self.streams[:start]
        stream = min(order, key=lambda s: s.in_flight)  # min keeps the first of equals
        return stream.submit_batch(batch)

    @property
    def in_flight(self) -> int:
        return sum(s.in_flight for s in self.streams)

    def close(self, timeout_s: float | None = None) -> None:
        """Wait up to `timeout_s` in all for answers in flight, then end every stream."""
        deadline = time.monotonic() + (self.client.timeout_s if timeout_s is None else timeout_s)
        for stream in self.streams:
            stream.close(timeout_s=max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> TeacherStreams:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
