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
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from sqlalchemy.orm import Session, sessionmaker

from maskedkd.purpose import purpose_problem
from maskedkd.v1 import teacher_pb2 as pb
from teacher_server.engine.batcher import BatchJob, BatchStats
from teacher_server.engine.metering import Usage
from teacher_server.engine.preprocess import PreparedInput, prepare_input
from teacher_server.engine.registry import ModelRegistry, ServedModel
from teacher_server.errors import (
    InvalidRequestError,
    ReplayExpiredError,
    RequestIdReusedError,
    ServiceError,
)
from teacher_server.ledger import billing, models
from teacher_server.ledger.billing import (
    Hold,
    LimitState,
    unavailable_on_transient_errors,
)
from teacher_server.metrics import ServerMetrics
from teacher_server.service.auth import KeyInfo
from teacher_server.service.content_digest import content_digest
from teacher_server.service.quota_status import quota_exceeded

OFFLOAD_BYTES = 1 << 20          # decode payloads above this size off the event loop
MAX_REQUEST_ID_CHARS = 200       # the ledger column's width
DEFAULT_REPLAY_TTL_S = 7 * 86400.0

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
class InferOutcome:
    request_id: str
    model: str
    logits: torch.Tensor   # [B, classes] float32
    usage: Usage
    replayed: bool
    limits: LimitState | None = None   # the key's quota/rate-limit state, for the response metadata


@dataclass(frozen=True)
class _Billing:
    """What finalize needs to write a request's usage row (travels through the batcher as the job context)."""

    key: KeyInfo
    request_id: str
    replayable: bool
    model: str
    usage: Usage
    received_at: float
    digest: str | None = None     # None for server-assigned ids
    hold: Hold | None = None      # GFLOPs reserved against the key's quota/rate limit
    purpose: str = ""             # InferRequest.purpose, stored with the row
    accept_billed: bool = False   # InferRequest.accept_billed_answer: a stored answer of another digest will do


class _RetryYourself(Exception):
    """The original of a duplicate failed without billing: the duplicate must run on its own."""


def logits_to_bytes(logits: torch.Tensor) -> tuple[bytes, str]:
    arr = logits.detach().to(torch.float32).contiguous().cpu().numpy().astype("<f4", copy=False)
    return arr.tobytes(), ",".join(str(s) for s in arr.shape)


def reused_error(request_id: str) -> RequestIdReusedError:
    return RequestIdReusedError(f"request_id {request_id[:80]!r} was already used with different inputs; "
                                "nothing billed")


def outcome_from_stored(record: models.UsageRecord, payload: models.ReplayPayload | None,
                        digest: str, *, accept_billed: bool = False, images: int = 0) -> InferOutcome:
    """The replay of a stored request, or the refusal: other inputs (ALREADY_EXISTS), answer gone (FAILED_PRECONDITION).
    Rows billed before digests existed (content_digest None) are replayed without comparing inputs. With
    `accept_billed` (a resumed run's re-send) other inputs are replayed too when the batch has the same `images`."""
    if record.content_digest is not None and record.content_digest != digest and not (
            accept_billed and record.images == images):
        raise reused_error(record.request_id)
    if payload is None:
        raise ReplayExpiredError(f"request_id {record.request_id[:80]!r} was billed before, but its answer is no "
                                 "longer kept (replay retention expired, or the id was server-assigned); nothing "
                                 "billed; send the request under a new request_id")
    shape = [int(s) for s in payload.logits_shape.split(",")]
    flat = torch.frombuffer(bytearray(payload.logits), dtype=torch.float32)  # little-endian hosts only, as the codec
    usage = Usage(images=record.images, tokens=record.tokens, flops=round(record.gflops * 1e9),
                  gflops=record.gflops, full_gflops=record.full_gflops, cost=record.cost)
    return InferOutcome(record.request_id, record.model, flat.reshape(shape).clone(), usage, replayed=True)


class InferenceService:
    def __init__(self, *, registry: ModelRegistry, sessions: sessionmaker[Session], metrics: ServerMetrics,
                 default_price_per_gflop: float, currency: str, max_message_bytes: int,
                 replay_ttl_s: float = DEFAULT_REPLAY_TTL_S) -> None:
        self.registry = registry
        self._sessions = sessions
        self._metrics = metrics
        self._default_price = default_price_per_gflop
        self._currency = currency  # stored with every usage row: reports show what was billed, not today's flags
        self._max_elements = max_message_bytes  # a tensor cannot hold more elements than the message has bytes
        self._replay_ttl_s = replay_ttl_s
        # (key id, request_id) -> (content digest, the original's outcome) of requests in flight
        self._inflight: dict[tuple[int, str], tuple[str, asyncio.Future[InferOutcome]]] = {}

    # ---------------------------------------------------------------------------------------- event loop side

    async def infer(self, key: KeyInfo, request: pb.InferRequest) -> InferOutcome:
        """Answer one request (billing it unless it is a replay); raises ServiceError subclasses on refusal."""
        received_at = time.monotonic()
        served = self.registry.get(request.model)
        current_labels().model = served.name
        outcome = await self._infer(key, request, served, received_at)
        self._metrics.request_latency.labels(model=served.name).observe(time.monotonic() - received_at)
        return outcome

    async def _infer(self, key: KeyInfo, request: pb.InferRequest, served: ServedModel,
                     received_at: float) -> InferOutcome:
        if len(request.request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidRequestError(f"request_id is {len(request.request_id)} characters; at most "
                                      f"{MAX_REQUEST_ID_CHARS} allowed")
        if "\x00" in request.request_id:  # Postgres text cannot store NUL; refuse it on every backend alike
            raise InvalidRequestError("request_id contains a NUL (\\x00) character, which is not allowed")
        if (problem := purpose_problem(request.purpose)) is not None:
            raise InvalidRequestError(problem)
        prepared = await self._prepare(request, served)
        usage = served.meter.usage(prepared.counts, price_per_gflop=self._price_of(key))
        if not request.request_id:
            rid = f"auto-{uuid.uuid4().hex}"
            return await self._run(key, served, prepared, usage, rid, replayable=False, received_at=received_at,
                                   purpose=request.purpose)

        digest = await self._digest(request, served.name)
        token = (key.id, request.request_id)
        while (entry := self._inflight.get(token)) is not None:
            if entry[0] != digest and not request.accept_billed_answer:
                raise reused_error(request.request_id)
            try:
                original = await asyncio.shield(entry[1])
            except _RetryYourself:
                continue
            if entry[0] != digest and original.usage.images != prepared.images:
                raise reused_error(request.request_id)
            return replace(original, replayed=True)
        mine: asyncio.Future[InferOutcome] = asyncio.get_running_loop().create_future()
        self._inflight[token] = (digest, mine)
        try:
            stored = await asyncio.to_thread(self._find_stored, key, request.request_id, digest,
                                             request.accept_billed_answer, prepared.images)
            if stored is not None:
                outcome = stored
            else:
                outcome = await self._run(key, served, prepared, usage, request.request_id, replayable=True,
                                          received_at=received_at, digest=digest, purpose=request.purpose,
                                          accept_billed=request.accept_billed_answer)
            mine.set_result(outcome)
            return outcome
        except BaseException as exc:
            # A refusal decided by the ledger holds for the duplicates too; anything else: they run on their own.
            final = isinstance(exc, (RequestIdReusedError, ReplayExpiredError))
            mine.set_exception(exc if final else _RetryYourself())
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
            return await asyncio.to_thread(prepare_input, request, served.teacher.geometry, max_images=max_images,
                                           max_elements=self._max_elements)
        return prepare_input(request, served.teacher.geometry, max_images=max_images, max_elements=self._max_elements)

    async def _run(self, key: KeyInfo, served: ServedModel, prepared: PreparedInput, usage: Usage, request_id: str,
                   *, replayable: bool, received_at: float, digest: str | None = None,
                   purpose: str = "", accept_billed: bool = False) -> InferOutcome:
        hold: Hold | None = None
        state: LimitState | None = None
        if key.limits.limited:
            hold, state = await asyncio.to_thread(self._reserve, key, usage.gflops)
            if hold is None:
                raise quota_exceeded(key=key, needed_gflops=usage.gflops, state=state)
        try:
            billing = _Billing(key, request_id, replayable, served.name, usage, received_at, digest, hold, purpose,
                               accept_billed)
            result = await served.batcher.submit(prepared, billing)
            if isinstance(result.finalized, Exception):
                raise result.finalized
        except BaseException:
            if hold is not None:  # settled already when the row committed; then this gives back nothing
                asyncio.get_running_loop().run_in_executor(None, self._release, hold)
            raise
        if result.finalized is not None:  # the ledger already held this request: replay what it stored
            return result.finalized
        self._metrics.count_billed(model=served.name, key=key.name, images=usage.images, gflops=usage.gflops,
                                   full_gflops=usage.full_gflops, cost=usage.cost)
        return InferOutcome(request_id, served.name, result.logits, usage, replayed=False, limits=state)

    def _price_of(self, key: KeyInfo) -> float:
        return key.price_per_gflop if key.price_per_gflop is not None else self._default_price

    # ------------------------------------------------------------------------------------------- worker side

    def _find_stored(self, key: KeyInfo, request_id: str, digest: str, accept_billed: bool,
                     images: int) -> InferOutcome | None:
        with unavailable_on_transient_errors(), self._sessions() as session:
            found = billing.find_billed(session, api_key_id=key.id, request_id=request_id)
            if found is None:
                return None
            outcome = outcome_from_stored(*found, digest, accept_billed=accept_billed, images=images)
            if key.limits.limited:
                outcome = replace(outcome, limits=billing.limit_state(session, api_key_id=key.id,
                                                                             limits=key.limits))
            return outcome

    def _reserve(self, key: KeyInfo, gflops: float) -> tuple[Hold | None, LimitState]:
        with unavailable_on_transient_errors(), self._sessions() as session:
            return billing.reserve(session, api_key_id=key.id, gflops=gflops, limits=key.limits)

    def _release(self, hold: Hold) -> None:
        try:
            with unavailable_on_transient_errors(), self._sessions() as session:
                billing.release(session, holds=[hold])
        except Exception:  # the hold expires and the periodic purge gives it back
            log.warning("could not release quota hold %d now; the purge will", hold.id, exc_info=True)

    async def limit_metadata(self, key: KeyInfo) -> LimitState | None:
        """The key's quota/rate-limit state now (None for a key without limits)."""
        if not key.limits.limited:
            return None

        def read() -> LimitState:
            with unavailable_on_transient_errors(), self._sessions() as session:
                return billing.limit_state(session, api_key_id=key.id, limits=key.limits)

        return await asyncio.to_thread(read)

    def finalize(self, jobs: Sequence[BatchJob], logits: Sequence[torch.Tensor],
                 stats: BatchStats) -> list[InferOutcome | ServiceError | None]:
        """Commit one usage row (and replay payload) per job in one transaction (before any response leaves).
        Returns per job None (billed now), or for a (key, request_id) billed before: its replay or the refusal."""
        now = time.monotonic()
        items = []
        for job, out in zip(jobs, logits):
            b: _Billing = job.context
            row = models.NewUsage(
                api_key_id=b.key.id, request_id=b.request_id, model=b.model, images=b.usage.images,
                tokens=b.usage.tokens, gflops=b.usage.gflops, full_gflops=b.usage.full_gflops, cost=b.usage.cost,
                latency_ms=(now - b.received_at) * 1000.0,
                queue_ms=max(0.0, stats.started_at - job.enqueued_at) * 1000.0,
                batch_images=stats.images, content_digest=b.digest,
                price_per_gflop=self._price_of(b.key), currency=self._currency, purpose=b.purpose,
            )
            items.append(billing.Billable(row, b.key.quota_window, logits_to_bytes(out) if b.replayable
                                                 else None, b.hold))
        with unavailable_on_transient_errors(), self._sessions() as session:
            stored = billing.bill(session, items=items, replay_ttl_s=self._replay_ttl_s)
            return [None if record is None else self._replay_or_error(session, record, job.context)
                    for record, job in zip(stored, jobs)]

    @staticmethod
    def _replay_or_error(session: Session, record: models.UsageRecord, b: _Billing) -> InferOutcome | ServiceError:
        """One job's problem must not fail the rest of its (committed) batch."""
        found = billing.find_billed(session, api_key_id=record.api_key_id, request_id=record.request_id)
        try:
            return outcome_from_stored(record, found[1] if found else None, b.digest or "",
                                       accept_billed=b.accept_billed, images=b.usage.images)
        except ServiceError as exc:
            return exc
