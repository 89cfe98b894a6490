"""The ledger's tables (SQLAlchemy 2; SQLite by default, Postgres too): API keys and one usage row per served request.

Exactly-once billing rests on the unique (api_key_id, request_id) constraint of `usage`: a row is only ever inserted
once, and a retry finds it and is answered from it when its content digest matches (replay payloads live in their own
table, `replay_payloads`, kept for a retention window; billing rows are kept forever). Per-key running totals and the
quota/rate-limit counters live in `key_counters` (quota_holds.py, billing.py); the schema is migrated by Alembic
(migrate.py, migrations/). The dashboard reads these same tables. The data-access modules beside this one take a
`Session` and keyword-only arguments; the caller owns the transaction unless a function says it commits.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from teacher_server.ledger.quota_windows import QuotaWindow


def utcnow() -> datetime:
    return datetime.now(UTC)


class LedgerError(RuntimeError):
    """A ledger operation that cannot be done as asked (message says why)."""


class DuplicateKeyNameError(LedgerError):
    pass


class UnknownKeyNameError(LedgerError):
    pass


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    key_prefix: Mapped[str] = mapped_column(String(12))  # first 12 chars of the secret, for display
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the secret
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    quota_gflops: Mapped[float | None] = mapped_column(Double, nullable=True)  # None: unlimited
    price_per_gflop: Mapped[float | None] = mapped_column(Double, nullable=True)  # None: server default
    quota_window: Mapped[QuotaWindow] = mapped_column(String(16), default="lifetime", server_default="lifetime")
    rate_limit_gflops_per_min: Mapped[float | None] = mapped_column(Double, nullable=True)  # None: no rate limit
    # the key's share of the teacher against keys with queued work, and its priority class
    # (engine/batching/scheduler.py; 0005)
    weight: Mapped[float] = mapped_column(Double, default=1.0, server_default="1")
    priority: Mapped[str] = mapped_column(String(16), default="standard", server_default="standard")

    usage: Mapped[list[UsageRecord]] = relationship(back_populates="api_key", lazy="noload")


class UsageRecord(Base):
    __tablename__ = "usage"
    __table_args__ = (
        UniqueConstraint("api_key_id", "request_id", name="uq_usage_key_request"),
        Index("ix_usage_created_at", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    api_key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"))
    request_id: Mapped[str] = mapped_column(String(200))
    model: Mapped[str] = mapped_column(String(200))
    images: Mapped[int] = mapped_column(Integer)
    tokens: Mapped[int] = mapped_column(BigInteger)
    gflops: Mapped[float] = mapped_column(Double)
    full_gflops: Mapped[float] = mapped_column(Double)
    cost: Mapped[float] = mapped_column(Double)
    # what this row was billed at (cost = gflops * price); None: billed before revision 0003 and not recoverable
    price_per_gflop: Mapped[float | None] = mapped_column(Double, nullable=True)
    currency: Mapped[str | None] = mapped_column(String(16), nullable=True)  # None: billed before revision 0003
    latency_ms: Mapped[float] = mapped_column(Double)
    queue_ms: Mapped[float] = mapped_column(Double)
    batch_images: Mapped[int] = mapped_column(Integer)  # images in the micro-batch it ran in
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # "blake3:<base64url>" (or, billed before 0005, bare sha256 hex) of what determines the answer (content_digest.py);
    # None: billed before digests existed
    content_digest: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # the client's InferRequest.purpose ('' = training targets, 'probe', ...): reports total each apart (0004)
    purpose: Mapped[str] = mapped_column(String(32), default="", server_default="")

    api_key: Mapped[ApiKey] = relationship(back_populates="usage", lazy="noload")


class ReplayPayload(Base):
    """The answer of a billed request, kept until `expires_at` so a retry can be replayed (purged after)."""

    __tablename__ = "replay_payloads"
    __table_args__ = (Index("ix_replay_payloads_expires_at", "expires_at"),)

    usage_id: Mapped[int] = mapped_column(ForeignKey("usage.id", ondelete="CASCADE"), primary_key=True)
    logits: Mapped[bytes] = mapped_column(LargeBinary)  # little-endian, row-major, in `logits_dtype`
    logits_shape: Mapped[str] = mapped_column(String(64))  # "B,C"
    # None: float32; "bfloat16": the high halves of float32 values whose low halves are 0 (0007)
    logits_dtype: Mapped[str | None] = mapped_column(String(16), nullable=True)
    outputs: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # serialized maskedkd.v1.Outputs
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class KeyCounter(Base):
    """One row per key: running totals of its usage rows (updated in the same transaction as each row) and the
    counters its quota and rate limit are checked against with one conditional UPDATE (quota_holds.py)."""

    __tablename__ = "key_counters"

    api_key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    images: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    gflops: Mapped[float] = mapped_column(Double, default=0.0, server_default="0")
    full_gflops: Mapped[float] = mapped_column(Double, default=0.0, server_default="0")
    cost: Mapped[float] = mapped_column(Double, default=0.0, server_default="0")
    reserved_gflops: Mapped[float] = mapped_column(Double, default=0.0, server_default="0")  # open quota holds
    window_start: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # epoch s; 0: lifetime
    window_gflops: Mapped[float] = mapped_column(Double, default=0.0, server_default="0")  # billed in the window
    rate_start: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # epoch s of the minute
    rate_gflops: Mapped[float] = mapped_column(Double, default=0.0, server_default="0")  # admitted this minute


class Refusal(Base):
    """Calls refused on one UTC day for one reason, per key: a counter row (refusals.py adds to it in batches).
    Nothing refused is billed; these rows only count."""

    __tablename__ = "refusals"

    day_start: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # epoch s of the UTC day
    api_key_id: Mapped[int] = mapped_column(Integer, primary_key=True)  # 0: no key known (bad or missing key)
    reason: Mapped[str] = mapped_column(String(32), primary_key=True)  # refusals.REASONS
    count: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class QuotaHold(Base):
    """GFLOPs reserved by one request between its admission and its commit (or release). A hold left behind by a
    crashed server expires and is purged, giving its GFLOPs back."""

    __tablename__ = "quota_holds"
    __table_args__ = (Index("ix_quota_holds_expires_at", "expires_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    api_key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"))
    gflops: Mapped[float] = mapped_column(Double)
    rate_start: Mapped[int] = mapped_column(BigInteger)  # the rate-limit minute the GFLOPs were admitted in
    expires_at: Mapped[int] = mapped_column(BigInteger)  # epoch s


@dataclass(frozen=True)
class NewUsage:
    """One usage row to insert (plain values, built outside any session)."""

    api_key_id: int
    request_id: str
    model: str
    images: int
    tokens: int
    gflops: float
    full_gflops: float
    cost: float
    latency_ms: float
    queue_ms: float
    batch_images: int
    content_digest: str | None = None  # "blake3:<base64url>" of the inputs; None for server-assigned ids
    price_per_gflop: float | None = None  # the price `cost` was computed with (the server always gives it)
    currency: str | None = None
    purpose: str = ""  # InferRequest.purpose, validated at the boundary


def usage_values(row: NewUsage, created_at: datetime) -> dict[str, Any]:
    """The column values of `row`'s usage record (a Core insert takes them; `usage_record` builds the ORM object)."""
    return {**vars(row), "created_at": created_at}  # a flat dataclass: asdict's deep copy costs ~20 us a row


def usage_record(row: NewUsage, created_at: datetime) -> UsageRecord:
    return UsageRecord(**usage_values(row, created_at))


def as_utc(moment: datetime) -> datetime:
    """Aware UTC datetime; naive values (SQLite gives those back) are taken to be UTC already."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
