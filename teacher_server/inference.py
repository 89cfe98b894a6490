"""The billing core of an inference request: validate, dedupe, check quota, batch, commit, answer.

Exactly-once: a request with a client `request_id` is answered from the ledger when (key, request_id) is stored
there (also after a restart); a duplicate arriving while the original is still in flight waits for it and gets
the same answer; the unique ledger constraint settles anything else (another server on the same database).
Quota: committed GFLOPs plus GFLOPs reserved by the key's in-flight requests plus this request must fit; the
reservation is released only after the commit, so concurrent requests can never overshoot the quota together.
"""
from __future__ import annotations

import asyncio
import contextvars
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from sqlalchemy.orm import Session, sessionmaker

from maskedkd.v1 import teacher_pb2 as pb
from teacher_server import ledger
from teacher_server.auth import KeyInfo
from teacher_server.batcher import BatchJob, BatchStats
from teacher_server.errors import InvalidRequestError, QuotaExceededError
from teacher_server.metering import Usage
from teacher_server.metrics import ServerMetrics
from teacher_server.preprocess import PreparedInput, prepare_input
from teacher_server.registry import ModelRegistry, ServedModel

OFFLOAD_BYTES = 1 << 20          # decode payloads above this size off the event loop
MAX_REQUEST_ID_CHARS = 200       # the ledger column's width


@dataclass
class CallLabels:
    """Metric labels of the current call, filled in as they become known (read by the interceptor)."""

    model: str = ""
    key: str = ""


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


@dataclass(frozen=True)
class _Billing:
    """What finalize needs to write a request's usage row (travels through the batcher as the job context)."""

    key: KeyInfo
    request_id: str
    replayable: bool
    model: str
    usage: Usage
    received_at: float


class _RetryYourself(Exception):
    """The original of a duplicate failed without billing: the duplicate must run on its own."""


def logits_to_bytes(logits: torch.Tensor) -> tuple[bytes, str]:
    arr = logits.detach().to(torch.float32).contiguous().cpu().numpy().astype("<f4", copy=False)
    return arr.tobytes(), ",".join(str(s) for s in arr.shape)


def logits_from_record(record: ledger.UsageRecord) -> torch.Tensor:
    if record.logits is None or not record.logits_shape:
        raise InvalidRequestError(f"request_id {record.request_id!r} was already used by a request whose logits "
                                  "were not kept (it had a server-assigned id); choose a new request_id")
    shape = [int(s) for s in record.logits_shape.split(",")]
    flat = torch.frombuffer(bytearray(record.logits), dtype=torch.float32)  # little-endian hosts only, as the codec
    return flat.reshape(shape).clone()


def outcome_from_record(record: ledger.UsageRecord) -> InferOutcome:
    usage = Usage(images=record.images, tokens=record.tokens, flops=round(record.gflops * 1e9),
                  gflops=record.gflops, full_gflops=record.full_gflops, cost=record.cost)
    return InferOutcome(record.request_id, record.model, logits_from_record(record), usage, replayed=True)


class InferenceService:
    def __init__(self, *, registry: ModelRegistry, sessions: sessionmaker[Session], metrics: ServerMetrics,
                 default_price_per_gflop: float, max_message_bytes: int) -> None:
        self.registry = registry
        self._sessions = sessions
        self._metrics = metrics
        self._default_price = default_price_per_gflop
        self._max_elements = max_message_bytes  # a tensor cannot hold more elements than the message has bytes
        self._inflight: dict[tuple[int, str], asyncio.Future[InferOutcome]] = {}
        self._reserved_flops: defaultdict[int, int] = defaultdict(int)  # key id -> FLOPs of uncommitted requests

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
        prepared = await self._prepare(request, served)
        price = key.price_per_gflop if key.price_per_gflop is not None else self._default_price
        usage = served.meter.usage(prepared.counts, price_per_gflop=price)
        if not request.request_id:
            rid = f"auto-{uuid.uuid4().hex}"
            return await self._run(key, served, prepared, usage, rid, replayable=False, received_at=received_at)

        token = (key.id, request.request_id)
        while (original := self._inflight.get(token)) is not None:
            try:
                return replace(await asyncio.shield(original), replayed=True)
            except _RetryYourself:
                continue
        mine: asyncio.Future[InferOutcome] = asyncio.get_running_loop().create_future()
        self._inflight[token] = mine
        try:
            stored = await asyncio.to_thread(self._find_stored, key.id, request.request_id)
            if stored is not None:
                outcome = stored
            else:
                outcome = await self._run(key, served, prepared, usage, request.request_id, replayable=True,
                                          received_at=received_at)
            mine.set_result(outcome)
            return outcome
        except BaseException:
            mine.set_exception(_RetryYourself())
            mine.exception()  # mark retrieved: nobody may be waiting
            raise
        finally:
            if self._inflight.get(token) is mine:
                del self._inflight[token]

    async def _prepare(self, request: pb.InferRequest, served: ServedModel) -> PreparedInput:
        payload = request.images if request.WhichOneof("input") == "images" else request.patches
        max_images = served.batcher.max_batch_images
        if len(payload.data) > OFFLOAD_BYTES:
            return await asyncio.to_thread(prepare_input, request, served.spec, max_images=max_images,
                                           max_elements=self._max_elements)
        return prepare_input(request, served.spec, max_images=max_images, max_elements=self._max_elements)

    async def _run(self, key: KeyInfo, served: ServedModel, prepared: PreparedInput, usage: Usage, request_id: str,
                   *, replayable: bool, received_at: float) -> InferOutcome:
        if key.quota_gflops is not None:
            used = await asyncio.to_thread(self._used_gflops, key.id)
            reserved = self._reserved_flops[key.id] / 1e9
            if used + reserved + usage.gflops > key.quota_gflops:
                raise QuotaExceededError(
                    f"quota exceeded for API key {key.name!r}: {used + reserved:.6g} of {key.quota_gflops:.6g} "
                    f"GFLOPs used, this request needs {usage.gflops:.6g} more; nothing was billed")
        self._reserved_flops[key.id] += usage.flops
        try:
            billing = _Billing(key, request_id, replayable, served.name, usage, received_at)
            result = await served.batcher.submit(prepared, billing)
        finally:
            self._reserved_flops[key.id] -= usage.flops
            if self._reserved_flops[key.id] == 0:
                del self._reserved_flops[key.id]
        if isinstance(result.finalized, Exception):
            raise result.finalized
        if result.finalized is not None:  # the ledger already held this request: replay what it stored
            return result.finalized
        self._metrics.count_billed(model=served.name, key=key.name, images=usage.images, gflops=usage.gflops,
                                   full_gflops=usage.full_gflops, cost=usage.cost)
        return InferOutcome(request_id, served.name, result.logits, usage, replayed=False)

    # ------------------------------------------------------------------------------------------- worker side

    def _find_stored(self, api_key_id: int, request_id: str) -> InferOutcome | None:
        with self._sessions() as session:
            record = ledger.find_usage(session, api_key_id=api_key_id, request_id=request_id)
            return None if record is None else outcome_from_record(record)

    def _used_gflops(self, api_key_id: int) -> float:
        with self._sessions() as session:
            return ledger.used_gflops(session, api_key_id=api_key_id)

    def finalize(self, jobs: Sequence[BatchJob], logits: Sequence[torch.Tensor],
                 stats: BatchStats) -> list[InferOutcome | InvalidRequestError | None]:
        """Commit one usage row per job in one transaction (worker thread, before any response leaves).
        Returns per job None (billed now) or the stored outcome when its (key, request_id) was billed before."""
        now = time.monotonic()
        rows = []
        for job, out in zip(jobs, logits):
            b: _Billing = job.context
            raw, shape = logits_to_bytes(out) if b.replayable else (None, None)
            rows.append(ledger.NewUsage(
                api_key_id=b.key.id, request_id=b.request_id, model=b.model, images=b.usage.images,
                tokens=b.usage.tokens, gflops=b.usage.gflops, full_gflops=b.usage.full_gflops, cost=b.usage.cost,
                latency_ms=(now - b.received_at) * 1000.0,
                queue_ms=max(0.0, stats.started_at - job.enqueued_at) * 1000.0,
                batch_images=stats.images, logits=raw, logits_shape=shape,
            ))
        with self._sessions() as session:
            stored = ledger.insert_usage_rows(session, rows=rows)
        return [None if record is None else _replay_or_error(record) for record in stored]


def _replay_or_error(record: ledger.UsageRecord) -> InferOutcome | InvalidRequestError:
    try:
        return outcome_from_record(record)
    except InvalidRequestError as exc:  # one job's problem must not fail the rest of its (committed) batch
        return exc
