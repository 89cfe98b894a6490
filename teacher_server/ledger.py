"""The billing ledger: API keys and one usage row per served request (SQLAlchemy 2; SQLite by default, Postgres too).

Exactly-once billing rests on the unique (api_key_id, request_id) constraint of `usage`: a row is only ever inserted
once, and a retry finds it and is answered from it when its content digest matches (replay payloads live in their own
table, `replay_payloads`, kept for a retention window; billing rows are kept forever). Per-key running totals and the
quota/rate-limit counters live in `key_counters` (ledger_billing.py); the schema is migrated by Alembic
(ledger_migrate.py, teacher_server/migrations). The dashboard reads these same tables.
All data-access functions take a `Session` and keyword-only arguments; the caller owns the transaction unless the
function says it commits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import (
    BigInteger, Boolean, ColumnElement, DateTime, Double, Engine, ForeignKey, Index, Integer, LargeBinary, String,
    UniqueConstraint,
    and_, create_engine, event, func, select,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

SQLITE_BUSY_TIMEOUT_S = 30.0  # writers wait this long for the SQLite write lock instead of failing at once
QUOTA_WINDOWS = ("lifetime", "month", "day")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


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
    key_prefix: Mapped[str] = mapped_column(String(12))                  # first 12 chars of the secret, for display
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)       # sha256 hex of the secret
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    quota_gflops: Mapped[float | None] = mapped_column(Double, nullable=True)     # None: unlimited
    price_per_gflop: Mapped[float | None] = mapped_column(Double, nullable=True)  # None: server default
    quota_window: Mapped[str] = mapped_column(String(16), default="lifetime", server_default="lifetime")
    rate_limit_gflops_per_min: Mapped[float | None] = mapped_column(Double, nullable=True)  # None: no rate limit

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
    batch_images: Mapped[int] = mapped_column(Integer)                   # images in the micro-batch it ran in
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # sha256 hex of what determines the answer (inference.content_digest); None: billed before digests existed
    content_digest: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # the client's InferRequest.purpose ('' = training targets, 'probe', ...): reports total each apart (0004)
    purpose: Mapped[str] = mapped_column(String(32), default="", server_default="")

    api_key: Mapped[ApiKey] = relationship(back_populates="usage", lazy="noload")


class ReplayPayload(Base):
    """The answer of a billed request, kept until `expires_at` so a retry can be replayed (purged after)."""

    __tablename__ = "replay_payloads"
    __table_args__ = (Index("ix_replay_payloads_expires_at", "expires_at"),)

    usage_id: Mapped[int] = mapped_column(ForeignKey("usage.id", ondelete="CASCADE"), primary_key=True)
    logits: Mapped[bytes] = mapped_column(LargeBinary)                   # float32 little-endian, row-major
    logits_shape: Mapped[str] = mapped_column(String(64))                # "B,C"
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class KeyCounter(Base):
    """One row per key: running totals of its usage rows (updated in the same transaction as each row) and the
    counters its quota and rate limit are checked against with one conditional UPDATE (ledger_billing.py)."""

    __tablename__ = "key_counters"

    api_key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    images: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    gflops: Mapped[float] = mapped_column(Double, default=0.0, server_default="0")
    full_gflops: Mapped[float] = mapped_column(Double, default=0.0, server_default="0")
    cost: Mapped[float] = mapped_column(Double, default=0.0, server_default="0")
    reserved_gflops: Mapped[float] = mapped_column(Double, default=0.0, server_default="0")  # open quota holds
    window_start: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")     # epoch s; 0: lifetime
    window_gflops: Mapped[float] = mapped_column(Double, default=0.0, server_default="0")    # billed in the window
    rate_start: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")       # epoch s of the minute
    rate_gflops: Mapped[float] = mapped_column(Double, default=0.0, server_default="0")      # admitted this minute


class Refusal(Base):
    """Calls refused on one UTC day for one reason, per key: a counter row (refusals.py adds to it in batches).
    Nothing refused is billed; these rows only count."""

    __tablename__ = "refusals"

    day_start: Mapped[int] = mapped_column(BigInteger, primary_key=True)    # epoch s of the UTC day
    api_key_id: Mapped[int] = mapped_column(Integer, primary_key=True)      # 0: no key known (bad or missing key)
    reason: Mapped[str] = mapped_column(String(32), primary_key=True)       # refusals.REASONS
    count: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class QuotaHold(Base):
    """GFLOPs reserved by one request between its admission and its commit (or release). A hold left behind by a
    crashed server expires and is purged, giving its GFLOPs back."""

    __tablename__ = "quota_holds"
    __table_args__ = (Index("ix_quota_holds_expires_at", "expires_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    api_key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"))
    gflops: Mapped[float] = mapped_column(Double)
    rate_start: Mapped[int] = mapped_column(BigInteger)   # the rate-limit minute the GFLOPs were admitted in
    expires_at: Mapped[int] = mapped_column(BigInteger)   # epoch s


# ----------------------------------------------------------------------------------------------------------------
# engine


def make_engine(url: str, *, busy_timeout_s: float = SQLITE_BUSY_TIMEOUT_S) -> Engine:
    """An engine for `url`; SQLite files get WAL, a busy timeout and enforced foreign keys."""
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    database = url.split("///", 1)[1] if "///" in url else ""
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": busy_timeout_s, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; a crash loses at most the last commits
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return engine


def missing_sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL when that file does not exist; None when it exists or the URL names no file (memory,
    `file:` URIs, other databases). Commands that only read a ledger refuse a missing one instead of creating it."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return None
    database = parsed.database or ""
    if not parsed.get_backend_name() == "sqlite" or database in ("", ":memory:") or database.startswith("file:"):
        return None
    path = Path(database).expanduser()
    return None if path.exists() else path


def open_ledger(url: str, *, busy_timeout_s: float = SQLITE_BUSY_TIMEOUT_S) -> sessionmaker[Session]:
    """Engine + schema (created or upgraded to the newest Alembic revision) + a session factory, in one call."""
    from teacher_server.ledger_migrate import upgrade_to_head

    engine = make_engine(url, busy_timeout_s=busy_timeout_s)
    upgrade_to_head(engine)
    return sessionmaker(engine, expire_on_commit=False)


# ----------------------------------------------------------------------------------------------------------------
# api keys


def add_api_key(
    session: Session, *, name: str, key_prefix: str, key_hash: str, quota_gflops: float | None = None,
    price_per_gflop: float | None = None, quota_window: str = "lifetime",
    rate_limit_gflops_per_min: float | None = None,
) -> ApiKey:
    """Insert a key (and its zeroed counters) and commit; `DuplicateKeyNameError` when the name is taken."""
    if find_api_key_by_name(session, name=name) is not None:
        raise DuplicateKeyNameError(f"an API key named {name!r} already exists")
    key = ApiKey(name=name, key_prefix=key_prefix, key_hash=key_hash, quota_gflops=quota_gflops,
                 price_per_gflop=price_per_gflop, disabled=False, created_at=utcnow(), quota_window=quota_window,
                 rate_limit_gflops_per_min=rate_limit_gflops_per_min)
    session.add(key)
    try:
        session.flush()
        session.add(KeyCounter(api_key_id=key.id, window_start=window_start(quota_window, utcnow())))
        session.commit()
    except IntegrityError as exc:
        session.rollback()
        raise DuplicateKeyNameError(f"an API key named {name!r} already exists") from exc
    return key


def window_start(quota_window: str, now: datetime) -> int:
    """Epoch seconds where the quota window holding `now` began (UTC calendar day or month; 0 for lifetime)."""
    now = now.astimezone(timezone.utc)
    if quota_window == "day":
        return int(now.replace(hour=0, minute=0, second=0, microsecond=0).timestamp())
    if quota_window == "month":
        return int(now.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp())
    return 0


def find_api_key_by_hash(session: Session, *, key_hash: str) -> ApiKey | None:
    return session.scalars(select(ApiKey).where(ApiKey.key_hash == key_hash)).one_or_none()


def find_api_key_by_name(session: Session, *, name: str) -> ApiKey | None:
    return session.scalars(select(ApiKey).where(ApiKey.name == name)).one_or_none()


def list_api_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


def set_api_key_disabled(session: Session, *, name: str, disabled: bool = True) -> ApiKey:
    """Disable (or re-enable) a key by name and commit; `UnknownKeyNameError` when there is none."""
    key = find_api_key_by_name(session, name=name)
    if key is None:
        raise UnknownKeyNameError(f"no API key named {name!r}")
    key.disabled = disabled
    session.commit()
    return key


def set_api_key_limits(
    session: Session, *, name: str, quota_gflops: float | None, price_per_gflop: float | None,
) -> ApiKey:
    """Replace a key's quota and price (None: unlimited / server default) and commit."""
    key = find_api_key_by_name(session, name=name)
    if key is None:
        raise UnknownKeyNameError(f"no API key named {name!r}")
    key.quota_gflops = quota_gflops
    key.price_per_gflop = price_per_gflop
    session.commit()
    return key


# ----------------------------------------------------------------------------------------------------------------
# usage


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
    content_digest: str | None = None  # sha256 hex of the inputs; None for server-assigned ids
    price_per_gflop: float | None = None  # the price `cost` was computed with (the server always gives it)
    currency: str | None = None
    purpose: str = ""  # InferRequest.purpose, validated at the boundary


def usage_record(row: NewUsage, created_at: datetime) -> UsageRecord:
    return UsageRecord(
        api_key_id=row.api_key_id, request_id=row.request_id, model=row.model, images=row.images, tokens=row.tokens,
        gflops=row.gflops, full_gflops=row.full_gflops, cost=row.cost, latency_ms=row.latency_ms,
        queue_ms=row.queue_ms, batch_images=row.batch_images, created_at=created_at,
        content_digest=row.content_digest, price_per_gflop=row.price_per_gflop, currency=row.currency,
        purpose=row.purpose,
    )


def find_usage(session: Session, *, api_key_id: int, request_id: str) -> UsageRecord | None:
    return session.scalars(
        select(UsageRecord).where(UsageRecord.api_key_id == api_key_id, UsageRecord.request_id == request_id)
    ).one_or_none()


def used_gflops(session: Session, *, api_key_id: int) -> float:
    """GFLOPs billed to a key so far (its running total: one primary-key read)."""
    total = session.scalar(select(KeyCounter.gflops).where(KeyCounter.api_key_id == api_key_id))
    return float(total or 0.0)


def as_utc(moment: datetime) -> datetime:
    """Aware UTC datetime; naive values (SQLite gives those back) are taken to be UTC already."""
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def usage_window(*, since: datetime | None, until: datetime | None) -> list[ColumnElement[bool]]:
    """Conditions selecting usage rows in [since, until) (either end open when None)."""
    conditions: list[ColumnElement[bool]] = []
    if since is not None:
        conditions.append(UsageRecord.created_at >= as_utc(since))
    if until is not None:
        conditions.append(UsageRecord.created_at < as_utc(until))
    return conditions


def saving_pct(gflops: float, full_gflops: float) -> float:
    """Share of the full teacher's GFLOPs the masked forwards saved, in percent (0 without usage)."""
    if full_gflops <= 0 or math.isnan(full_gflops):
        return 0.0
    return 100.0 * (1.0 - gflops / full_gflops)


@dataclass(frozen=True)
class KeyTotals:
    """One key with the totals of its usage rows (in a time window when one was asked for)."""

    name: str
    key_prefix: str
    disabled: bool
    created_at: datetime
    quota_gflops: float | None
    price_per_gflop: float | None
    requests: int
    images: int
    tokens: int
    gflops: float
    full_gflops: float
    cost: float
    last_used_at: datetime | None

    @property
    def saving_pct(self) -> float:
        return saving_pct(self.gflops, self.full_gflops)


def usage_totals(
    session: Session, *, key_name: str | None = None, since: datetime | None = None, until: datetime | None = None,
) -> list[KeyTotals]:
    """Every key (also those without usage) with the totals of its rows in [since, until), ordered by name;
    only `key_name` when given (UnknownKeyNameError when no key has that name)."""
    stmt = (
        select(
            ApiKey.name, ApiKey.key_prefix, ApiKey.disabled, ApiKey.created_at, ApiKey.quota_gflops,
            ApiKey.price_per_gflop, func.count(UsageRecord.id), func.coalesce(func.sum(UsageRecord.images), 0),
            func.coalesce(func.sum(UsageRecord.tokens), 0), func.coalesce(func.sum(UsageRecord.gflops), 0.0),
            func.coalesce(func.sum(UsageRecord.full_gflops), 0.0), func.coalesce(func.sum(UsageRecord.cost), 0.0),
            func.max(UsageRecord.created_at),
        )
        .select_from(ApiKey)
        .outerjoin(UsageRecord, and_(UsageRecord.api_key_id == ApiKey.id, *usage_window(since=since, until=until)))
        .group_by(ApiKey.id, ApiKey.name, ApiKey.key_prefix, ApiKey.disabled, ApiKey.created_at,
                  ApiKey.quota_gflops, ApiKey.price_per_gflop)
        .order_by(ApiKey.name)
    )
    if key_name is not None:
        if find_api_key_by_name(session, name=key_name) is None:
            raise UnknownKeyNameError(f"no API key named {key_name!r}")
        stmt = stmt.where(ApiKey.name == key_name)
    totals = []
    for r in session.execute(stmt):
        last_used = r[12]
        if isinstance(last_used, str):  # SQLite returns max() of a DATETIME column as its stored text
            last_used = datetime.fromisoformat(last_used)
        totals.append(KeyTotals(
            name=r[0], key_prefix=r[1], disabled=bool(r[2]), created_at=as_utc(r[3]), quota_gflops=r[4],
            price_per_gflop=r[5], requests=int(r[6]), images=int(r[7]), tokens=int(r[8]), gflops=float(r[9]),
            full_gflops=float(r[10]), cost=float(r[11]), last_used_at=as_utc(last_used) if last_used else None,
        ))
    return totals

