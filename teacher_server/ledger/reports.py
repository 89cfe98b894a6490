"""Read-side reports of the ledger shared by `teacher-server usage` and the dashboard: what each key was billed at
(price and currency as stored with its rows), what each purpose cost (training targets '' and the client's `probe`
requests apart), usage per UTC day with its probe share, refused calls per day, and the CSV export.

Money is reported as billed: the price and currency come from the usage rows, never from the server's current
settings; rows billed before revision 0003 have no recorded currency (None, shown as "unknown").
All functions take a `Session` and keyword-only arguments and work on SQLite and Postgres.
"""
from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Any, TextIO

from sqlalchemy import BigInteger, ColumnElement, and_, case, func, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import FunctionElement

from maskedkd.purpose import PROBE
from teacher_server.ledger.keys import find_api_key_by_name
from teacher_server.ledger.models import (
    ApiKey,
    KeyCounter,
    Refusal,
    UnknownKeyNameError,
    UsageRecord,
    as_utc,
)


def used_gflops(session: Session, *, api_key_id: int) -> float:
    """GFLOPs billed to a key so far (its running total: one primary-key read)."""
    total = session.scalar(select(KeyCounter.gflops).where(KeyCounter.api_key_id == api_key_id))
    return float(total or 0.0)


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


DAY_S = 86400
UNKNOWN_CURRENCY = "unknown"  # how reports name the currency of rows billed before it was recorded


class bucket_start_epoch(FunctionElement[int]):  # noqa: N801 (SQL function style)
    """Epoch seconds of the start of the `width_s`-second bucket holding a timestamp column (UTC)."""

    type = BigInteger()
    inherit_cache = False  # `width_s` is rendered as a literal, so statements with different widths differ

    def __init__(self, column: Any, width_s: int) -> None:
        self.width_s = int(width_s)
        super().__init__(column)


@compiles(bucket_start_epoch, "sqlite")
def _bucket_sqlite(element: bucket_start_epoch, compiler: Any, **kw: Any) -> str:
    column = compiler.process(element.clauses, **kw)
    width = element.width_s
    # strftime('%s') reads SQLAlchemy's stored 'YYYY-MM-DD HH:MM:SS.ffffff' (UTC) as whole epoch seconds
    return f"((CAST(strftime('%s', {column}) AS INTEGER) / {width}) * {width})"


@compiles(bucket_start_epoch)
def _bucket_default(element: bucket_start_epoch, compiler: Any, **kw: Any) -> str:
    column = compiler.process(element.clauses, **kw)
    width = element.width_s
    # Postgres: EXTRACT(EPOCH) of a timestamptz is true epoch seconds; of a naive timestamp, as if it were UTC
    return f"CAST(FLOOR(EXTRACT(EPOCH FROM {column}) / {width}) * {width} AS BIGINT)"


def currency_name(currency: str | None) -> str:
    return UNKNOWN_CURRENCY if currency is None else currency


@dataclass(frozen=True)
class BilledPrice:
    """The rows of one key billed at one price in one currency."""

    key: str
    price_per_gflop: float | None   # None: not recoverable (a row without GFLOPs from before revision 0003)
    currency: str | None            # None: billed before the currency was recorded
    requests: int
    gflops: float
    cost: float


def billed_prices(session: Session, *, since: datetime | None = None, until: datetime | None = None,
                  key_name: str | None = None) -> list[BilledPrice]:
    """Per key, the distinct (price, currency) its rows in [since, until) were billed at, ordered by key."""
    stmt = (
        select(ApiKey.name, UsageRecord.price_per_gflop, UsageRecord.currency, func.count(UsageRecord.id),
               func.sum(UsageRecord.gflops), func.sum(UsageRecord.cost))
        .select_from(UsageRecord).join(ApiKey, ApiKey.id == UsageRecord.api_key_id)
        .where(*usage_window(since=since, until=until))
        .group_by(ApiKey.name, UsageRecord.price_per_gflop, UsageRecord.currency)
        .order_by(ApiKey.name, UsageRecord.currency, UsageRecord.price_per_gflop)
    )
    if key_name is not None:
        stmt = stmt.where(ApiKey.name == key_name)
    return [BilledPrice(key=r[0], price_per_gflop=r[1], currency=r[2], requests=int(r[3]), gflops=float(r[4] or 0),
                        cost=float(r[5] or 0)) for r in session.execute(stmt)]


@dataclass(frozen=True)
class PurposeUsage:
    """The rows of one key requested for one purpose ('' = training targets), billed in one currency."""

    key: str
    purpose: str
    currency: str | None
    requests: int
    images: int
    tokens: int
    gflops: float
    full_gflops: float
    cost: float


def usage_by_purpose(session: Session, *, since: datetime | None = None, until: datetime | None = None,
                     key_name: str | None = None) -> list[PurposeUsage]:
    """Per key, the totals of its rows in [since, until) per (purpose, currency), ordered by key and purpose."""
    stmt = (
        select(ApiKey.name, UsageRecord.purpose, UsageRecord.currency, func.count(UsageRecord.id),
               func.sum(UsageRecord.images), func.sum(UsageRecord.tokens), func.sum(UsageRecord.gflops),
               func.sum(UsageRecord.full_gflops), func.sum(UsageRecord.cost))
        .select_from(UsageRecord).join(ApiKey, ApiKey.id == UsageRecord.api_key_id)
        .where(*usage_window(since=since, until=until))
        .group_by(ApiKey.name, UsageRecord.purpose, UsageRecord.currency)
        .order_by(ApiKey.name, UsageRecord.purpose, UsageRecord.currency)
    )
    if key_name is not None:
        stmt = stmt.where(ApiKey.name == key_name)
    return [PurposeUsage(key=r[0], purpose=r[1], currency=r[2], requests=int(r[3]), images=int(r[4] or 0),
                         tokens=int(r[5] or 0), gflops=float(r[6] or 0), full_gflops=float(r[7] or 0),
                         cost=float(r[8] or 0)) for r in session.execute(stmt)]


@dataclass(frozen=True)
class DayUsage:
    """Usage of one key on one UTC day at one price and currency."""

    day: date
    key: str
    currency: str | None
    price_per_gflop: float | None
    requests: int
    images: int
    tokens: int
    gflops: float
    full_gflops: float
    cost: float
    probe_requests: int = 0     # the part of the above requested with purpose 'probe'
    probe_gflops: float = 0.0
    probe_cost: float = 0.0


def _probe_sum(column: Any) -> Any:
    return func.sum(case((UsageRecord.purpose == PROBE, column), else_=0))


def usage_by_day(session: Session, *, since: datetime | None = None, until: datetime | None = None,
                 key_name: str | None = None) -> list[DayUsage]:
    """Non-empty (UTC day, key, currency, price) cells of the rows in [since, until), ordered by day and key."""
    day = bucket_start_epoch(UsageRecord.created_at, DAY_S).label("day")
    stmt = (
        select(day, ApiKey.name, UsageRecord.currency, UsageRecord.price_per_gflop, func.count(UsageRecord.id),
               func.sum(UsageRecord.images), func.sum(UsageRecord.tokens), func.sum(UsageRecord.gflops),
               func.sum(UsageRecord.full_gflops), func.sum(UsageRecord.cost), _probe_sum(1),
               _probe_sum(UsageRecord.gflops), _probe_sum(UsageRecord.cost))
        .select_from(UsageRecord).join(ApiKey, ApiKey.id == UsageRecord.api_key_id)
        .where(*usage_window(since=since, until=until))
        .group_by(day, ApiKey.name, UsageRecord.currency, UsageRecord.price_per_gflop)
        .order_by(day, ApiKey.name, UsageRecord.currency, UsageRecord.price_per_gflop)
    )
    if key_name is not None:
        stmt = stmt.where(ApiKey.name == key_name)
    return [DayUsage(day=datetime.fromtimestamp(int(r[0]), timezone.utc).date(), key=r[1], currency=r[2],
                     price_per_gflop=r[3], requests=int(r[4]), images=int(r[5] or 0), tokens=int(r[6] or 0),
                     gflops=float(r[7] or 0), full_gflops=float(r[8] or 0), cost=float(r[9] or 0),
                     probe_requests=int(r[10] or 0), probe_gflops=float(r[11] or 0), probe_cost=float(r[12] or 0))
            for r in session.execute(stmt)]


@dataclass(frozen=True)
class DayRefusals:
    """Calls refused on one UTC day for one reason, for one key (key None: no key known)."""

    day: date
    key: str | None
    reason: str
    count: int


def refusals_by_day(session: Session, *, since: datetime | None = None, until: datetime | None = None,
                    key_name: str | None = None) -> list[DayRefusals]:
    """Refusal counters of the days that overlap [since, until), ordered by day, key and reason."""
    stmt = (select(Refusal.day_start, ApiKey.name, Refusal.reason, Refusal.count)
            .select_from(Refusal).outerjoin(ApiKey, ApiKey.id == Refusal.api_key_id)
            .order_by(Refusal.day_start, ApiKey.name, Refusal.reason))
    if since is not None:
        stmt = stmt.where(Refusal.day_start > int(as_utc(since).timestamp()) - DAY_S)
    if until is not None:
        stmt = stmt.where(Refusal.day_start < int(as_utc(until).timestamp()))
    if key_name is not None:
        stmt = stmt.where(ApiKey.name == key_name)
    return [DayRefusals(day=datetime.fromtimestamp(int(r[0]), timezone.utc).date(), key=r[1], reason=r[2],
                        count=int(r[3])) for r in session.execute(stmt)]


CSV_COLUMNS = ("day", "key", "currency", "price_per_gflop", "requests", "images", "tokens", "gflops",
               "full_gflops", "cost", "probe_requests", "probe_gflops", "probe_cost")


def write_usage_csv(rows: Iterable[DayUsage], out: TextIO) -> None:
    """One line per (UTC day, key, currency, price); floats in repr form, so the sums read back exactly. The probe_*
    columns are the part of the line's requests, GFLOPs and cost requested with purpose 'probe'."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        writer.writerow([r.day.isoformat(), r.key, currency_name(r.currency),
                         "" if r.price_per_gflop is None else repr(r.price_per_gflop), r.requests, r.images,
                         r.tokens, repr(r.gflops), repr(r.full_gflops), repr(r.cost), r.probe_requests,
                         repr(r.probe_gflops), repr(r.probe_cost)])
