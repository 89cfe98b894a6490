"""The billing core of an inference request: validate, dedupe, check quota, batch, commit, answer.

Exactly-once, bound to content: a request with a client `request_id` carries a content digest (content_digest.py).
When (key, request_id) is stored in the ledger (also after a restart) or in flight, the same digest is replayed
(unbilled, `replayed=true`) and another digest is refused with ALREADY_EXISTS; a stored request whose replay payload
expired is refused with FAILED_PRECONDITION. The unique ledger constraint settles anything else (another server).
Quota and rate limit: admitted by one conditional UPDATE in the ledger before the forward (billing.reserve),
held until the usage row commits, so requests on any number of servers never overshoot together.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from dataclasses import dataclass, replace

from maskedkd.purpose import purpose_problem
from maskedkd.v1 import teacher_pb2 as pb
from teacher_server.engine.metering import MeteredUsage
from teacher_server.engine.preprocess import PreparedInput, prepare_input
from teacher_server.engine.served_model import ServedModel
from teacher_server.errors import InvalidRequestError, ReplayExpiredError, RequestIdReusedError
from teacher_server.ledger.billing import Hold, LimitState
from teacher_server.metrics import ServerMetrics
from teacher_server.service.auth import KeyInfo
from teacher_server.service.biller import Biller, BillingContext, InferOutcome, reused_error
from teacher_server.service.content_digest import content_digest
from teacher_server.service.quota_status import quota_exceeded

OFFLOAD_BYTES = 1 << 20  # decode payloads above this size off the event loop
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


class _OriginalFailedError(Exception):
    """The original of a duplicate failed without billing: the duplicate must run on its own."""


class InferenceService:
    def __init__(self, *, served: ServedModel, biller: Biller, metrics: ServerMetrics, max_message_bytes: int) -> None:
        self.served = served
        self._biller = biller
        self._metrics = metrics
        self._max_elements = max_message_bytes  # a tensor cannot hold more elements than the message has bytes
        # (key id, request_id) -> (content digest, the original's outcome) of requests in flight
        self._inflight: dict[tuple[int, str], tuple[str, asyncio.Future[InferOutcome]]] = {}

    # ---------------------------------------------------------------------------------------- event loop side

    async def infer(self, key: KeyInfo, request: pb.InferRequest) -> InferOutcome:
        """Answer one request (billing it unless it is a replay); raises ServiceError subclasses on refusal."""
        received_at = time.monotonic()
        served = self.served.named(request.model)
        current_labels().model = served.name
        outcome = await self._infer(key, request, served, received_at)
        self._metrics.request_latency.labels(model=served.name).observe(time.monotonic() - received_at)
        return outcome

    async def _infer(
        self, key: KeyInfo, request: pb.InferRequest, served: ServedModel, received_at: float
    ) -> InferOutcome:
        if len(request.request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidRequestError(
                f"request_id is {len(request.request_id)} characters; at most {MAX_REQUEST_ID_CHARS} allowed"
            )
        if "\x00" in request.request_id:  # Postgres text cannot store NUL; refuse it on every backend alike
            raise InvalidRequestError("request_id contains a NUL (\\x00) character, which is not allowed")
        if (problem := purpose_problem(request.purpose)) is not None:
            raise InvalidRequestError(problem)
        prepared = await self._prepare(request, served)
        usage = served.meter.usage(prepared.counts, price_per_gflop=self._biller.price_of(key))
        if not request.request_id:
            rid = f"auto-{uuid.uuid4().hex}"
            return await self._run(
                key, served, prepared, usage, rid, replayable=False, received_at=received_at, purpose=request.purpose
            )

        digest = await self._digest(request, served.name)
        token = (key.id, request.request_id)
        while (entry := self._inflight.get(token)) is not None:
            if entry[0] != digest and not request.accept_billed_answer:
                raise reused_error(request.request_id)
            try:
                original = await asyncio.shield(entry[1])
            except _OriginalFailedError:
                continue
            if entry[0] != digest and original.usage.images != prepared.images:
                raise reused_error(request.request_id)
            return replace(original, replayed=True)
        mine: asyncio.Future[InferOutcome] = asyncio.get_running_loop().create_future()
        self._inflight[token] = (digest, mine)
        try:
            stored = await asyncio.to_thread(
                self._biller.find_stored, key, request.request_id, digest, request.accept_billed_answer, prepared.images
            )
            if stored is not None:
                outcome = stored
            else:
                outcome = await self._run(
                    key,
                    served,
                    prepared,
                    usage,
                    request.request_id,
                    replayable=True,
                    received_at=received_at,
                    digest=digest,
                    purpose=request.purpose,
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

    async def _digest(self, request: pb.InferRequest, model: str) -> str:
        payload = request.images if request.WhichOneof("input") == "images" else request.patches
        if len(payload.data) > OFFLOAD_BYTES:
            return await asyncio.to_thread(content_digest, request, model=model)
        return content_digest(request, model=model)

    async def _prepare(self, request: pb.InferRequest, served: ServedModel) -> PreparedInput:
        payload = request.images if request.WhichOneof("input") == "images" else request.patches
        max_images = served.batcher.max_batch_images
        if len(payload.data) > OFFLOAD_BYTES:
            return await asyncio.to_thread(
                prepare_input, request, served.teacher.geometry, max_images=max_images, max_elements=self._max_elements
            )
        return prepare_input(request, served.teacher.geometry, max_images=max_images, max_elements=self._max_elements)

    async def _run(
        self,
        key: KeyInfo,
        served: ServedModel,
        prepared: PreparedInput,
        usage: MeteredUsage,
        request_id: str,
        *,
        replayable: bool,
        received_at: float,
        digest: str | None = None,
        purpose: str = "",
        accept_billed: bool = False,
    ) -> InferOutcome:
        hold: Hold | None = None
        state: LimitState | None = None
        if key.limits.limited:
            hold, limit = await asyncio.to_thread(self._biller.reserve, key, usage.gflops)
            if hold is None:
                raise quota_exceeded(key=key, needed_gflops=usage.gflops, state=limit)
            state = limit
        try:
            context = BillingContext(
                key, request_id, replayable, served.name, usage, received_at, digest, hold, purpose, accept_billed
            )
            result = await served.batcher.submit(prepared, context)
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
        return InferOutcome(request_id, served.name, result.logits, usage, replayed=False, limits=state)

    async def limit_metadata(self, key: KeyInfo) -> LimitState | None:
        """The key's quota/rate-limit state now (None for a key without limits)."""
        if not key.limits.limited:
            return None
        return await asyncio.to_thread(self._biller.limit_state, key)
