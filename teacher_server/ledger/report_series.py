"""The ledger's usage queries over time, one function per question, each returning rows of its own dataclass: usage
per UTC day (with its probe share), per time bucket, refused calls per day, and the most recent requests. Built with
the query helpers of reports.py (the per-key totals); usage_report.py and the dashboard assemble them.

Days and buckets are UTC epoch seconds computed in SQL (`bucket_start_epoch`): a request falls in the bucket of its
whole seconds, floored, on SQLite as on Postgres. Money is reported as billed, as in reports.py. All functions take a
`Session` and keyword-only arguments and work on SQLite and Postgres. The dataclasses that appear in the dashboard's
JSON document their fields with attribute docstrings, which pydantic turns into the API's field descriptions.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import BigInteger, case, func, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import FunctionElement

from maskedkd.purpose import PROBE
from teacher_server.ledger.models import ApiKey, Refusal, UsageRecord, as_utc
from teacher_server.ledger.reports import (
    DOCUMENTED,
    USAGE_SUMS,
    currency_name,
    of_key,
    sum_columns,
    sum_values,
    usage_groups,
    usage_of_keys,
)

DAY_S = 86400


def _utc_day(epoch_s: Any) -> date:
    return datetime.fromtimestamp(int(epoch_s), UTC).date()


class bucket_start_epoch(FunctionElement[int]):  # noqa: N801 - named like the SQL function it compiles to
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
    # strftime('%s') of SQLAlchemy's stored 'YYYY-MM-DD HH:MM:SS.ffffff' (UTC) rounds to the nearest millisecond
    # first, so 23:59:59.9996 would land in the next second, minute, hour and day; its first 19 characters are the
    # whole seconds, floored as Postgres and Python floor them
    return f"((CAST(strftime('%s', substr({column}, 1, 19)) AS INTEGER) / {width}) * {width})"


@compiles(bucket_start_epoch)
def _bucket_default(element: bucket_start_epoch, compiler: Any, **kw: Any) -> str:
    column = compiler.process(element.clauses, **kw)
    width = element.width_s
    # Postgres: EXTRACT(EPOCH) of a timestamptz is true epoch seconds; of a naive timestamp, as if it were UTC
    return f"CAST(FLOOR(EXTRACT(EPOCH FROM {column}) / {width}) * {width} AS BIGINT)"


@dataclass(frozen=True)
class DayUsage:
    """One key's usage on one UTC day at one price and currency (as billed); probe_* are the part of its requests,
    GFLOPs and cost sent with purpose 'probe'."""

    __pydantic_config__ = DOCUMENTED

    day: date
    key: str
    currency: str
    """'unknown' for rows billed before the currency was recorded"""
    price_per_gflop: float | None
    requests: int
    images: int
    tokens: int
    gflops: float
    full_gflops: float
    cost: float
    probe_requests: int
    probe_gflops: float
    probe_cost: float


def _probe_sum(column: Any) -> Any:
    return func.sum(case((UsageRecord.purpose == PROBE, column), else_=0))


def usage_by_day(
    session: Session, *, since: datetime | None = None, until: datetime | None = None, key_name: str | None = None
) -> list[DayUsage]:
    """Non-empty (UTC day, key, currency, price) cells of the rows in [since, until), ordered by day and key."""
    day = bucket_start_epoch(UsageRecord.created_at, DAY_S).label("day")
    days = (day, ApiKey.name.label("key"), UsageRecord.currency, UsageRecord.price_per_gflop)
    sums = [
        *sum_columns(*USAGE_SUMS),
        _probe_sum(1).label("probe_requests"),
        _probe_sum(UsageRecord.gflops).label("probe_gflops"),
        _probe_sum(UsageRecord.cost).label("probe_cost"),
    ]
    order = (day, ApiKey.name, UsageRecord.currency, UsageRecord.price_per_gflop)
    rows = usage_groups(session, days, sums, order, since=since, until=until, key_name=key_name)
    return [
        DayUsage(
            day=_utc_day(r.day),
            key=r.key,
            currency=currency_name(r.currency),
            price_per_gflop=r.price_per_gflop,
            **sum_values(r, "requests", *USAGE_SUMS),
            **sum_values(r, "probe_requests", "probe_gflops", "probe_cost"),
        )
        for r in rows
    ]


@dataclass(frozen=True)
class DayRefusals:
    """Calls refused on one UTC day for one reason, for one key."""

    __pydantic_config__ = DOCUMENTED

    day: date
    key: str | None
    """null: refused before a key was known"""
    reason: str
    """auth, quota, rate_limit or invalid"""
    count: int


def refusals_by_day(
    session: Session, *, since: datetime | None = None, until: datetime | None = None, key_name: str | None = None
) -> list[DayRefusals]:
    """Refusal counters of the days that overlap [since, until), ordered by day, key and reason."""
    stmt = (
        select(Refusal.day_start, ApiKey.name.label("key"), Refusal.reason, Refusal.count.label("calls"))
        .select_from(Refusal)
        .outerjoin(ApiKey, ApiKey.id == Refusal.api_key_id)
        .order_by(Refusal.day_start, ApiKey.name, Refusal.reason)
    )
    if since is not None:
        stmt = stmt.where(Refusal.day_start > int(as_utc(since).timestamp()) - DAY_S)
    if until is not None:
        stmt = stmt.where(Refusal.day_start < int(as_utc(until).timestamp()))
    return [
        DayRefusals(day=_utc_day(r.day_start), key=r.key, reason=r.reason, count=int(r.calls))
        for r in session.execute(of_key(stmt, key_name))
    ]


@dataclass(frozen=True)
class UsageBucket:
    """Usage of one key in one time bucket."""

    key: str
    start_epoch: int  # UTC epoch seconds of the bucket start
    requests: int
    images: int
    gflops: float
    full_gflops: float
    cost: float


def usage_by_bucket(
    session: Session,
    *,
    width_s: int,
    since: datetime | None = None,
    until: datetime | None = None,
    key_name: str | None = None,
) -> list[UsageBucket]:
    """Non-empty (key, bucket) cells in [since, until), ordered by bucket then key."""
    bucket = bucket_start_epoch(UsageRecord.created_at, width_s).label("start_epoch")
    summed = ("images", "gflops", "full_gflops", "cost")
    cells, order = (ApiKey.name.label("key"), bucket), (bucket, ApiKey.name)
    rows = usage_groups(session, cells, sum_columns(*summed), order, since=since, until=until, key_name=key_name)
    return [UsageBucket(key=r.key, start_epoch=int(r.start_epoch), **sum_values(r, "requests", *summed)) for r in rows]


@dataclass(frozen=True)
class RecentRequest:
    key: str
    latency_ms: float
    queue_ms: float
    images: int
    batch_images: int


def recent_requests(
    session: Session, *, limit: int, since: datetime | None = None, key_name: str | None = None
) -> list[RecentRequest]:
    """The last `limit` usage rows (newest first), optionally only after `since` and of one key."""
    stmt = usage_of_keys(
        ApiKey.name.label("key"),
        UsageRecord.latency_ms,
        UsageRecord.queue_ms,
        UsageRecord.images,
        UsageRecord.batch_images,
        since=since,
        until=None,
    ).order_by(UsageRecord.id.desc())
    return [
        RecentRequest(
            key=r.key,
            latency_ms=float(r.latency_ms),
            queue_ms=float(r.queue_ms),
            images=int(r.images),
            batch_images=int(r.batch_images),
        )
        for r in session.execute(of_key(stmt, key_name).limit(limit))
    ]
