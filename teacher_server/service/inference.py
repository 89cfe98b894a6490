"""The billing core of an inference request: validate, dedupe, check quota, batch, commit, answer.

Exactly-once, bound to content: a request with a client `request_id` carries a content digest (content_digest.py).
When (key, request_id) is stored in the ledger (also after a restart) or in flight, the same digest is replayed
(unbilled, `replayed=true`) and another digest is refused with ALREADY_EXISTS; a stored request whose replay payload
expired is refused with FAILED_PRECONDITION. The unique ledger constraint settles anything else (another server).
Quota and rate limit: admitted by one conditional UPDATE in the ledger before the forward (quota_holds.reserve),
held until the usage row commits, so requests on any number of servers never overshoot together.

Overload and deadlines, cheapest refusal first (each unbilled, counted as a refusal): a key whose queue is full is
refused before its message is read (auth_guard.py asks `admit`); then, decoded (a uint8 request's decode is a view
and a check of its indices), one whose pixel bytes or images do not fit the key's or the server's bound
(`_refuse_if_full`), or whose
deadline leaves less time than the expected queue wait and compute (`_refuse_if_late`). A queued request whose deadline
passes is dropped by the batcher unrun; one whose forward started is billed and its answer kept for a replay.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, replace

from maskedkd.purpose import purpose_problem
from maskedkd.v1 import teacher_pb2 as pb
from teacher_server.engine.rows.answers import NO_OUTPUTS, decode_outputs
from teacher_server.engine.rows.decode import DecodedInput, Pixels, declared_bytes, decode_input
from teacher_server.engine.served_model import ServedModel
from teacher_server.engine.teacher.metering import MeteredUsage
from teacher_server.errors import MIN_RETRY_S, InvalidRequestError, ReplayExpiredError, RequestIdReusedError
from teacher_server.ledger.quota_holds import Hold, LimitState
from teacher_server.metrics import ServerMetrics
from teacher_server.service.accounting.auth import KeyInfo
from teacher_server.service.accounting.biller import Biller, BillingContext, InferOutcome, reused_error
from teacher_server.service.accounting.content_digest import RequestDigest, content_digest
from teacher_server.service.accounting.quota_status import deadline_unmet, overloaded, quota_exceeded
from teacher_server.service.wire.pixels_in_place import InferWithPixels
from teacher_server.service.wire.shared_memory import read_shared_pixels, shared_input

OFFLOAD_BYTES = 16 << 20  # digest and check float payloads above this size off the event loop (a thread hop costs)
RECENT_REQUESTS = 8  # per key, the requests whose sizes admission remembers
RECENT_S = 10.0  # for this long
MAX_REQUEST_ID_CHARS = 200  # the ledger column's width

log = logging.getLogger(__name__)


@dataclass
class CallLabels:
    """Metric labels of the current call, filled in as they become known (read by the interceptor)."""

    model: str = ""
    key: str = ""
    key_id: int = 0  # 0: no key known (yet)


CURRENT_LABELS: contextvars.ContextVar[CallLabels | None] = contextvars.ContextVar("maskedkd_labels", default=None)


def current_labels() -> CallLabels:
    labels = CURRENT_LABELS.get()
    if labels is None:
        labels = CallLabels()
        CURRENT_LABELS.set(labels)
    return labels


@dataclass(frozen=True)
class Submission:
    """A decoded request on its way to the batcher."""

    input: DecodedInput
    usage: MeteredUsage  # what it will be billed
    received_at: float  # time.monotonic()
    deadline: float | None  # time.monotonic() the caller gives up
    purpose: str


def _check_fields(request: pb.InferRequest) -> None:
    """request_id and purpose, before anything is decoded."""
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequestError(
            f"request_id is {len(request.request_id)} characters; at most {MAX_REQUEST_ID_CHARS} allowed"
        )
    if "\x00" in request.request_id:  # Postgres text cannot store NUL; refuse it on every backend alike
        raise InvalidRequestError("request_id contains a NUL (\\x00) character, which is not allowed")
    if (problem := purpose_problem(request.purpose)) is not None:
        raise InvalidRequestError(problem)


class _OriginalFailedError(Exception):
    """The original of a duplicate failed without billing: the duplicate must run on its own."""


class InferenceService:
    def __init__(
        self,
        *,
        served: ServedModel,
        biller: Biller,
        metrics: ServerMetrics,
        max_message_bytes: int,
        shared_memory: bool = False,
    ) -> None:
        self.served = served
        self._shared_memory = shared_memory  # read pixels from shared memory regions of local callers
        self.listening: tuple[str, int] = ("", 0)  # the server's host and port once bound (who calls: peer_user.py)
        self._biller = biller
        self._metrics = metrics
        self._max_elements = max_message_bytes  # a tensor cannot hold more elements than the message has bytes
        # (key id, request_id) -> (content digest, the original's outcome) of requests in flight
        self._inflight: dict[tuple[int, str], tuple[str, asyncio.Future[InferOutcome]]] = {}
        self._recent_tokens: dict[int, deque[tuple[float, int]]] = {}  # key id -> (when, tokens) of its requests

    # ---------------------------------------------------------------------------------------- event loop side

    def admit(self, key: KeyInfo, time_left_s: float | None = None) -> None:
        """Before a message of `key` is read: OverloadedError when its queue (or the server's) is full already,
        DeadlineUnmetError when the work queued ahead of it alone outlasts the call's `time_left_s`."""
        self._refuse_if_full(key)
        if time_left_s is not None:
            self._refuse_if_late(key, self._smallest_recent(key.id), time_left_s)

    def _refuse_if_full(self, key: KeyInfo, *, nbytes: int = 0, images: int = 0) -> None:
        """OverloadedError (counted) when the key's queue or the server's has no room for this much more."""
        if (why := self.served.batcher.queue.room_for(key.id, nbytes=nbytes, images=images)) is not None:
            self._metrics.count_shed(key=key.name, reason="overload")
            raise overloaded(why, retry_s=self._retry_s(key))

    def _refuse_if_late(self, key: KeyInfo, tokens: int, time_left_s: float) -> None:
        """DeadlineUnmetError (counted) when a request of `tokens` queued now would answer after `time_left_s`."""
        wait = self.served.batcher.expected_wait_s(key.id, key.priority, tokens, key.weight)
        if wait > time_left_s:
            self._metrics.count_shed(key=key.name, reason="deadline_admission")
            raise deadline_unmet(wait_s=wait, time_left_s=time_left_s)

    def _smallest_recent(self, key_id: int) -> int:
        """Tokens of the smallest request the key sent in the last RECENT_S seconds (0: none). A key sending only
        requests too big for their deadline is so refused before their bytes are read; a key mixing sizes is not
        refused on a guess, and a key refused this way has one request read again every RECENT_S seconds."""
        recent = self._recent_tokens.get(key_id)
        if not recent:
            return 0
        since = time.monotonic() - RECENT_S
        while recent and recent[0][0] < since:
            recent.popleft()
        return min((tokens for _, tokens in recent), default=0)

    def _retry_s(self, key: KeyInfo) -> float:
        """When a refused request of `key` might find room: the time its queued work takes to run."""
        batcher = self.served.batcher
        return max(MIN_RETRY_S, batcher.compute.seconds(batcher.queue.key_tokens(key.id)))

    async def infer(
        self,
        key: KeyInfo,
        received: pb.InferRequest | InferWithPixels,
        *,
        deadline: float | None = None,
        peer: str = "",
    ) -> InferOutcome:
        """Answer one request (billing it unless it is a replay); raises ServiceError subclasses on refusal.
        `received`: the request, or the request and its pixels where they arrived (pixels_in_place.py). `deadline`:
        the time.monotonic() at which the caller gives up (None: never). `peer`: gRPC's name of the caller's end of
        the connection (`context.peer()`: who may pass pixels in shared memory, shared_memory.py)."""
        received_at = time.monotonic()
        request, in_message = (
            (received.message, received.pixels) if isinstance(received, InferWithPixels) else (received, None)
        )
        served = self.served.named(request.model)
        current_labels().model = served.name
        _check_fields(request)  # before a shared memory region is read
        pixels = in_message if in_message is not None else self._shared_pixels(request, peer)
        decoded = await self._decode(request, served, pixels)
        # The pixel bytes count against the queue bounds from here (a view of the message: what it holds in memory);
        # sizing the whole message instead would encode it again (upb keeps no size), ~10 us an image.
        nbytes = len(decoded.payload)
        self._metrics.count_ingested(nbytes)
        self._refuse_if_full(key, nbytes=nbytes, images=decoded.images)
        counted = served.batcher.queue.reserve_bytes(key.id, nbytes)
        try:
            outcome = await self._infer(key, request, served, decoded, received_at, deadline)
        finally:
            served.batcher.queue.release_bytes(key.id, nbytes, counted=counted)
        self._metrics.request_latency.labels(model=served.name).observe(time.monotonic() - received_at)
        return outcome

    async def _infer(
        self,
        key: KeyInfo,
        request: pb.InferRequest,
        served: ServedModel,
        decoded: DecodedInput,
        received_at: float,
        deadline: float | None,
    ) -> InferOutcome:
        recent = self._recent_tokens.setdefault(key.id, deque(maxlen=RECENT_REQUESTS))
        recent.append((time.monotonic(), served.batcher.tokens_of(decoded)))
        usage = served.meter.usage(decoded.counts, price_per_gflop=self._biller.price_of(key))
        run = Submission(decoded, usage, received_at, deadline, request.purpose)
        if not request.request_id:
            return await self._run(key, served, run, f"auto-{uuid.uuid4().hex}", replayable=False)

        digest = await self._digest(request, served.name, decoded.payload)
        token = (key.id, request.request_id)
        while (entry := self._inflight.get(token)) is not None:
            if entry[0] != digest.value and not request.accept_billed_answer:
                raise reused_error(request.request_id)
            try:
                original = await asyncio.shield(entry[1])
            except _OriginalFailedError:
                continue
            if entry[0] != digest.value and original.usage.images != decoded.images:
                raise reused_error(request.request_id)
            return replace(original, replayed=True)
        mine: asyncio.Future[InferOutcome] = asyncio.get_running_loop().create_future()
        self._inflight[token] = (digest.value, mine)
        try:
            stored = await asyncio.to_thread(
                self._metrics.timed("ledger_lookup", self._biller.find_stored),
                key,
                request.request_id,
                digest,
                request.accept_billed_answer,
                decoded.images,
            )
            if stored is not None:
                outcome = stored
            else:
                outcome = await self._run(
                    key,
                    served,
                    run,
                    request.request_id,
                    replayable=True,
                    digest=digest,
                    accept_billed=request.accept_billed_answer,
                )
            mine.set_result(outcome)
            return outcome
        except BaseException as exc:
            # A refusal decided by the ledger holds for the duplicates too; anything else: they run on their own.
            final = isinstance(exc, (RequestIdReusedError, ReplayExpiredError))
            mine.set_exception(exc if final else _OriginalFailedError())
            mine.exception()  # mark retrieved: nobody may be waiting
            raise
        finally:
            if self._inflight.get(token, (None, None))[1] is mine:
                del self._inflight[token]

    async def _digest(self, request: pb.InferRequest, model: str, payload: Pixels) -> RequestDigest:
        digest = self._metrics.timed("digest", content_digest)
        if len(payload) > OFFLOAD_BYTES:
            return await asyncio.to_thread(digest, request, model=model, payload=payload)
        return digest(request, model=model, payload=payload)

    def _shared_pixels(self, request: pb.InferRequest, peer: str) -> bytes | None:
        """The pixel bytes of a request whose input names a shared memory region (None: they are in the message)."""
        if shared_input(request) is None:
            return None
        with self._metrics.stage("receive"):
            pixels = read_shared_pixels(
                request, enabled=self._shared_memory, peer=peer, listening=self.listening, max_bytes=self._max_elements
            )
        self._metrics.shared_memory_bytes.inc(len(pixels))
        return pixels

    async def _decode(self, request: pb.InferRequest, served: ServedModel, pixels: Pixels | None) -> DecodedInput:
        """Check the request and view its pixels (no copy; float pixels get one range check, off the loop when big).
        `pixels`: the bytes read from its shared memory region, or viewed in the message as received."""
        decode = self._metrics.timed("decode", decode_input)
        geometry, max_images = served.teacher.geometry, served.batcher.max_batch_images
        outputs = decode_outputs(request, served.teacher)
        limits = {"max_images": max_images, "max_elements": self._max_elements, "pixel_bytes": pixels}
        if not self._uint8_input(request) and declared_bytes(request) > OFFLOAD_BYTES:
            decoded = await asyncio.to_thread(decode, request, geometry, **limits)
        else:
            decoded = decode(request, geometry, **limits)
        return decoded if outputs is NO_OUTPUTS else replace(decoded, outputs=outputs)

    @staticmethod
    def _uint8_input(request: pb.InferRequest) -> bool:
        kind = request.WhichOneof("input")
        return kind is not None and getattr(request, kind).dtype == "uint8"

    async def _run(
        self,
        key: KeyInfo,
        served: ServedModel,
        run: Submission,
        request_id: str,
        *,
        replayable: bool,
        digest: RequestDigest | None = None,
        accept_billed: bool = False,
    ) -> InferOutcome:
        if run.deadline is not None:
            tokens = served.batcher.tokens_of(run.input)
            self._refuse_if_late(key, tokens, run.deadline - time.monotonic())
        usage = run.usage
        hold: Hold | None = None
        state: LimitState | None = None
        if key.limits.limited:
            hold, limit = await asyncio.to_thread(self._biller.reserve, key, usage.gflops)
            if hold is None:
                raise quota_exceeded(key=key, needed_gflops=usage.gflops, state=limit)
            state = limit
        try:
            context = BillingContext(
                key,
                request_id,
                replayable,
                served.name,
                usage,
                run.received_at,
                digest,
                hold,
                run.purpose,
                accept_billed,
            )
            result = await served.batcher.submit(
                run.input,
                context,
                key_id=key.id,
                key_name=key.name,
                weight=key.weight,
                priority=key.priority,
                deadline=run.deadline,
            )
            if isinstance(result.finalized, Exception):
                raise result.finalized
        except BaseException:
            if hold is not None:  # settled already when the row committed; then this gives back nothing
                asyncio.get_running_loop().run_in_executor(None, self._biller.release, hold)
            raise
        if result.finalized is not None:  # the ledger already held this request: replay what it stored
            return result.finalized
        self._metrics.count_billed(
            model=served.name,
            key=key.name,
            images=usage.images,
            gflops=usage.gflops,
            full_gflops=usage.full_gflops,
            cost=usage.cost,
        )
        return InferOutcome(
            request_id, served.name, result.logits, usage, replayed=False, limits=state, outputs=result.outputs
        )

    async def limit_metadata(self, key: KeyInfo) -> LimitState | None:
        """The key's quota/rate-limit state now (None for a key without limits)."""
        if not key.limits.limited:
            return None
        return await asyncio.to_thread(self._biller.limit_state, key)
