"""Read-side queries of the dashboard: usage per key, per key and time bucket, and recent latency figures.

They read the ledger's tables through its ORM models (`teacher_server.ledger`) and work on SQLite and Postgres:
time buckets are computed in SQL as epoch seconds of the bucket start (`ledger_reports.bucket_start_epoch`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from teacher_server.ledger.models import ApiKey, UsageRecord
from teacher_server.ledger.reports import bucket_start_epoch, usage_window


@dataclass(frozen=True)
class BucketRow:
    """Usage of one key in one time bucket."""

    key: str
    start_epoch: int     # UTC epoch seconds of the bucket start
    requests: int
    images: int
    gflops: float
    full_gflops: float
    cost: float


def usage_by_bucket(
    session: Session, *, width_s: int, since: datetime | None = None, until: datetime | None = None,
    key_name: str | None = None,
) -> list[BucketRow]:
    """Non-empty (key, bucket) cells in [since, until), ordered by bucket then key."""
    bucket = bucket_start_epoch(UsageRecord.created_at, width_s).label("bucket")
    stmt = (
        select(ApiKey.name, bucket, func.count(UsageRecord.id), func.sum(UsageRecord.images),
               func.sum(UsageRecord.gflops), func.sum(UsageRecord.full_gflops), func.sum(UsageRecord.cost))
        .select_from(UsageRecord)
        .join(ApiKey, ApiKey.id == UsageRecord.api_key_id)
        .where(*usage_window(since=since, until=until))
        .group_by(ApiKey.name, bucket)
        .order_by(bucket, ApiKey.name)
    )
    if key_name is not None:
        stmt = stmt.where(ApiKey.name == key_name)
    return [
        BucketRow(key=r[0], start_epoch=int(r[1]), requests=int(r[2]), images=int(r[3] or 0),
                  gflops=float(r[4] or 0.0), full_gflops=float(r[5] or 0.0), cost=float(r[6] or 0.0))
        for r in session.execute(stmt)
    ]


@dataclass(frozen=True)
class RecentRequest:
    key: str
    latency_ms: float
    queue_ms: float
    images: int
    batch_images: int


def recent_requests(
    session: Session, *, limit: int, since: datetime | None = None, key_name: str | None = None,
) -> list[RecentRequest]:
    """The last `limit` usage rows (newest first), optionally only after `since` and of one key."""
    stmt = (
        select(ApiKey.name, UsageRecord.latency_ms, UsageRecord.queue_ms, UsageRecord.images,
               UsageRecord.batch_images)
        .select_from(UsageRecord)
        .join(ApiKey, ApiKey.id == UsageRecord.api_key_id)
        .where(*usage_window(since=since, until=None))
        .order_by(UsageRecord.id.desc())
        .limit(limit)
    )
    if key_name is not None:
        stmt = stmt.where(ApiKey.name == key_name)
    return [RecentRequest(key=r[0], latency_ms=float(r[1]), queue_ms=float(r[2]), images=int(r[3]),
                          batch_images=int(r[4])) for r in session.execute(stmt)]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default); nan if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
