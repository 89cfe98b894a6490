"""The ledger side of serving a request, run in worker threads: find a stored answer, reserve and release quota,
and commit a micro-batch's usage rows with their replay payloads (one transaction per batch, before any answer
leaves). `InferenceService` (inference.py) calls it from the event loop; the batcher's commit stage calls
`finalize`."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from maskedkd.v1 import teacher_pb2 as pb
from teacher_server.engine.batching.batch_job import BatchJob, BatchStats
from teacher_server.engine.rows.answers import Answer
from teacher_server.engine.teacher.metering import MeteredUsage
from teacher_server.errors import ReplayExpiredError, RequestIdReusedError, ServiceError
from teacher_server.ledger import billing, models, quota_holds
from teacher_server.ledger.billing import unavailable_on_transient_errors
from teacher_server.ledger.quota_holds import Hold, LimitState
from teacher_server.metrics import ServerMetrics
from teacher_server.service.accounting.auth import KeyInfo
from teacher_server.service.accounting.content_digest import RequestDigest
from teacher_server.service.accounting.replay_logits import logits_of, stored_logits

DEFAULT_REPLAY_TTL_S = 7 * 86400.0

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferOutcome:
    request_id: str
    model: str
    logits: torch.Tensor  # [B, classes] float32
    usage: MeteredUsage
    replayed: bool
    limits: LimitState | None = None  # the key's quota/rate-limit state, for the response metadata
    outputs: pb.Outputs | None = None  # the extra outputs asked for (None: logits only)


@dataclass(frozen=True)
class BillingContext:
    """What finalize needs to write a request's usage row (travels through the batcher as the job context)."""

    key: KeyInfo
    request_id: str
    replayable: bool
    model: str
    usage: MeteredUsage
    received_at: float
    digest: RequestDigest | None = None  # None for server-assigned ids
    hold: Hold | None = None  # GFLOPs reserved against the key's quota/rate limit
    purpose: str = ""  # InferRequest.purpose, stored with the row
    accept_billed: bool = False  # InferRequest.accept_billed_answer: a stored answer of another digest will do


def reused_error(request_id: str) -> RequestIdReusedError:
    return RequestIdReusedError(
        f"request_id {request_id[:80]!r} was already used with different inputs; nothing billed"
    )


def outcome_from_stored(
    record: models.UsageRecord,
    payload: models.ReplayPayload | None,
    digest: RequestDigest | None,
    *,
    accept_billed: bool = False,
    images: int = 0,
) -> InferOutcome:
    """The replay of a stored request, or the refusal: other inputs (ALREADY_EXISTS), answer gone (FAILED_PRECONDITION).
    Rows billed before digests existed (content_digest None) are replayed without comparing inputs. With
    `accept_billed` (a resumed run's re-send) other inputs are replayed too when the batch has the same `images`."""
    if (
        record.content_digest is not None
        and not (digest is not None and digest.matches(record.content_digest))
        and not (accept_billed and record.images == images)
    ):
        raise reused_error(record.request_id)
    if payload is None:
        raise ReplayExpiredError(
            f"request_id {record.request_id[:80]!r} was billed before, but its answer is no "
            "longer kept (replay retention expired, or the id was server-assigned); nothing "
            "billed; send the request under a new request_id"
        )
    logits = logits_of(payload.logits, payload.logits_shape, payload.logits_dtype)
    outputs = pb.Outputs.FromString(payload.outputs) if payload.outputs is not None else None
    usage = MeteredUsage(
        images=record.images,
        tokens=record.tokens,
        flops=round(record.gflops * 1e9),
        gflops=record.gflops,
        full_gflops=record.full_gflops,
        cost=record.cost,
    )
    return InferOutcome(record.request_id, record.model, logits, usage, replayed=True, outputs=outputs)


def _unclaimable(job: BatchJob) -> bool:
    """Whether the job's answer can reach nobody: its caller left (cancelled, or its deadline passed) during the
    forward, and it sent no request_id, so no retry can be given the answer. Such a job is not billed. With a
    request_id the answer is kept and replayed to the retry, so that job is billed."""
    context: BillingContext = job.context
    return not context.replayable and job.caller_gone


class Biller:
    """Ledger reads and writes of the serving path; every call opens its own session (worker threads only)."""

    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        default_price_per_gflop: float,
        currency: str,
        replay_ttl_s: float = DEFAULT_REPLAY_TTL_S,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self._sessions = sessions
        self._metrics = metrics  # counts the images run for callers who left with no way to get the answer
        self._engine: Engine = sessions.kw["bind"]
        self._default_price = default_price_per_gflop
        self._currency = currency  # stored with every usage row: reports show what was billed, not today's flags
        self._replay_ttl_s = replay_ttl_s

    def price_of(self, key: KeyInfo) -> float:
        return key.price_per_gflop if key.price_per_gflop is not None else self._default_price

    def find_stored(
        self, key: KeyInfo, request_id: str, digest: RequestDigest, accept_billed: bool, images: int
    ) -> InferOutcome | None:
        with unavailable_on_transient_errors(), self._engine.connect() as connection:
            if not billing.billed_before(connection, api_key_id=key.id, request_id=request_id):
                return None  # nearly every request: never billed, one read
        with unavailable_on_transient_errors(), self._sessions() as session:
            found = billing.find_billed(session, api_key_id=key.id, request_id=request_id)
            if found is None:
                return None
            outcome = outcome_from_stored(*found, digest, accept_billed=accept_billed, images=images)
            if key.limits.limited:
                outcome = replace(
                    outcome, limits=quota_holds.limit_state(session, api_key_id=key.id, limits=key.limits)
                )
            return outcome

    def reserve(self, key: KeyInfo, gflops: float) -> tuple[Hold | None, LimitState]:
        with unavailable_on_transient_errors(), self._sessions() as session:
            return quota_holds.reserve(session, api_key_id=key.id, gflops=gflops, limits=key.limits)

    def release(self, hold: Hold) -> None:
        try:
            with unavailable_on_transient_errors(), self._sessions() as session:
                quota_holds.release(session, holds=[hold])
        except Exception:  # the hold expires and the periodic purge gives it back
            log.warning("could not release quota hold %d now; the purge will", hold.id, exc_info=True)

    def finalize(
        self, jobs: Sequence[BatchJob], answers: Sequence[Answer], stats: BatchStats
    ) -> list[InferOutcome | ServiceError | None]:
        """Commit one usage row (and replay payload) per job in one transaction (before any response leaves).
        Returns per job None (billed now, or not billed: see `_unclaimable`), or for a (key, request_id) billed
        before: its replay or the refusal."""
        now = time.monotonic()
        billed = [not _unclaimable(job) for job in jobs]
        for job, bill in zip(jobs, billed, strict=True):
            if not bill and self._metrics is not None:
                self._metrics.count_unbilled(key=job.context.key.name, images=job.context.usage.images)
        items = [self._billable(j, a, stats, now) for j, a, bill in zip(jobs, answers, billed, strict=True) if bill]
        if not items:
            return [None] * len(jobs)
        with unavailable_on_transient_errors(), self._sessions() as session:
            stored = iter(billing.bill(session, items=items, replay_ttl_s=self._replay_ttl_s))
            records = [next(stored) if bill else None for bill in billed]
            return [
                None if record is None else self._replay_or_error(session, record, job.context)
                for record, job in zip(records, jobs, strict=True)
            ]

    def _billable(self, job: BatchJob, answer: Answer, stats: BatchStats, now: float) -> billing.Billable:
        """The job's usage row, with its replay payload when its request_id is the client's."""
        b: BillingContext = job.context
        row = models.NewUsage(
            api_key_id=b.key.id,
            request_id=b.request_id,
            model=b.model,
            images=b.usage.images,
            tokens=b.usage.tokens,
            gflops=b.usage.gflops,
            full_gflops=b.usage.full_gflops,
            cost=b.usage.cost,
            latency_ms=(now - b.received_at) * 1000.0,
            queue_ms=max(0.0, stats.started_at - job.enqueued_at) * 1000.0,
            batch_images=stats.images,
            content_digest=b.digest.value if b.digest else None,
            price_per_gflop=self.price_of(b.key),
            currency=self._currency,
            purpose=b.purpose,
        )
        kept = b.replayable
        return billing.Billable(
            row,
            b.key.quota_window,
            stored_logits(answer.logits) if kept else None,
            b.hold,
            answer.outputs.SerializeToString() if kept and answer.outputs is not None else None,
        )

    @staticmethod
    def _replay_or_error(
        session: Session, record: models.UsageRecord, b: BillingContext
    ) -> InferOutcome | ServiceError:
        """One job's problem must not fail the rest of its (committed) batch."""
        found = billing.find_billed(session, api_key_id=record.api_key_id, request_id=record.request_id)
        try:
            return outcome_from_stored(
                record, found[1] if found else None, b.digest, accept_billed=b.accept_billed, images=b.usage.images
            )
        except ServiceError as exc:
            return exc

    def limit_state(self, key: KeyInfo) -> LimitState:
        """The key's quota/rate-limit state now."""
        with unavailable_on_transient_errors(), self._sessions() as session:
            return quota_holds.limit_state(session, api_key_id=key.id, limits=key.limits)
