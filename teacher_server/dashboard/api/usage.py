"""GET /api/usage/...: totals per key (with what probe requests cost), time series per key and bucket, usage and
refusals per day (JSON and CSV), recent latency and batch sizes (read-only). Prices and currencies are those stored
with the usage rows."""
from __future__ import annotations

import io
import math
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, status
from fastapi.responses import Response

from maskedkd.purpose import PROBE
from teacher_server.dashboard import queries
from teacher_server.dashboard.access import require_viewer
from teacher_server.dashboard.deps import SessionDep
from teacher_server.dashboard.schemas import (
    BilledPrice,
    Bucket,
    CurrencyCost,
    DailyUsage,
    DayRefusals,
    DayUsage,
    ErrorMessage,
    KeySeries,
    KeyUsage,
    LatencyFigures,
    PurposeCost,
    RecentLatency,
    UsageByKey,
    UsageSeries,
    UsageTotals,
)
from teacher_server.ledger import reports
from teacher_server.ledger.keys import find_api_key_by_name
from teacher_server.ledger.reports import (
    as_utc,
    currency_name,
    saving_pct,
    usage_totals,
)

router = APIRouter(prefix="/api/usage", tags=["usage"], dependencies=[Depends(require_viewer)],
                   responses={401: {"model": ErrorMessage, "description": "missing or wrong viewer token"},
                              403: {"model": ErrorMessage, "description": "read views locked (no token configured)"}})

BUCKET_SECONDS = {Bucket.minute: 60, Bucket.hour: 3600, Bucket.day: reports.DAY_S}
DEFAULT_WINDOW = {Bucket.minute: timedelta(hours=6), Bucket.hour: timedelta(days=7), Bucket.day: timedelta(days=90)}
MAX_BUCKETS = 2000  # per series response; more asks for a coarser bucket or a shorter window

SinceQuery = Annotated[datetime | None, Query(description="ISO 8601 start (inclusive); naive means UTC")]
UntilQuery = Annotated[datetime | None, Query(description="ISO 8601 end (exclusive); naive means UTC")]
# no NUL: Postgres text cannot hold it, so such a name can match no key (422, not a database error)
KeyQuery = Annotated[str | None, Query(max_length=200, pattern=r"^[^\x00]*$",
                                       description="only this API key (by name)")]


def _check_window(since: datetime | None, until: datetime | None) -> None:
    if since is not None and until is not None and as_utc(since) >= as_utc(until):
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "`since` must be before `until`")


def _unknown_key(session: SessionDep, key: str | None) -> None:
    if key is not None and find_api_key_by_name(session, name=key) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no API key named {key!r}")


def _one_currency(currencies: set[str]) -> str | None:
    return next(iter(currencies)) if len(currencies) == 1 else None


@router.get("/keys", response_model=UsageByKey, responses={400: {"model": ErrorMessage}, 404: {"model": ErrorMessage}},
            summary="Usage totals per API key")
def usage_by_key(session: SessionDep, since: SinceQuery = None, until: UntilQuery = None,
                 key: KeyQuery = None) -> UsageByKey:
    """Requests, images, GFLOPs used, GFLOPs a full teacher would have used, saving, cost and the prices billed per
    key, in a window (default: all time), plus the total over all keys and the calls refused."""
    _check_window(since, until)
    _unknown_key(session, key)
    rows = usage_totals(session, since=since, until=until, key_name=key)
    billed: dict[str, list[BilledPrice]] = defaultdict(list)
    for b in reports.billed_prices(session, since=since, until=until, key_name=key):
        billed[b.key].append(BilledPrice(price_per_gflop=b.price_per_gflop, currency=currency_name(b.currency),
                                         requests=b.requests, gflops=b.gflops, cost=b.cost))
    purposes: dict[str, list[PurposeCost]] = defaultdict(list)
    for p in reports.usage_by_purpose(session, since=since, until=until, key_name=key):
        purposes[p.key].append(PurposeCost(purpose=p.purpose, currency=currency_name(p.currency),
                                           requests=p.requests, images=p.images, tokens=p.tokens, gflops=p.gflops,
                                           full_gflops=p.full_gflops, cost=p.cost))
    refused: dict[str | None, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in reports.refusals_by_day(session, since=since, until=until):
        refused[r.key][r.reason] += r.count
    lifetime = {r.name: r.gflops for r in rows}
    if since is not None or until is not None:
        lifetime = {r.name: r.gflops for r in usage_totals(session, key_name=key)}
    keys = []
    for r in rows:
        quota_pct: float | None = None
        if r.quota_gflops is not None:  # a zero quota is spent from the start
            quota_pct = 100.0 * lifetime[r.name] / r.quota_gflops if r.quota_gflops > 0 else 100.0
        probes = [p for p in purposes[r.name] if p.purpose == PROBE]
        keys.append(KeyUsage(
            name=r.name, key_prefix=r.key_prefix, disabled=r.disabled, created_at=r.created_at,
            quota_gflops=r.quota_gflops, price_per_gflop=r.price_per_gflop,
            currency=_one_currency({b.currency for b in billed[r.name]}), billed=billed[r.name],
            by_purpose=purposes[r.name], probe_requests=sum(p.requests for p in probes),
            probe_gflops=math.fsum(p.gflops for p in probes), probe_cost=math.fsum(p.cost for p in probes),
            refused=dict(refused.get(r.name, {})), quota_used_pct=quota_pct,
            last_used_at=r.last_used_at, requests=r.requests, images=r.images, tokens=r.tokens, gflops=r.gflops,
            full_gflops=r.full_gflops, saved_gflops=r.full_gflops - r.gflops,
            saving_pct=saving_pct(r.gflops, r.full_gflops), cost=r.cost,
        ))
    gflops = sum(k.gflops for k in keys)
    full = sum(k.full_gflops for k in keys)
    total = UsageTotals(
        requests=sum(k.requests for k in keys), images=sum(k.images for k in keys),
        tokens=sum(k.tokens for k in keys), gflops=gflops, full_gflops=full, saved_gflops=full - gflops,
        saving_pct=saving_pct(gflops, full), cost=sum(k.cost for k in keys),
        probe_requests=sum(k.probe_requests for k in keys), probe_gflops=math.fsum(k.probe_gflops for k in keys),
        probe_cost=math.fsum(k.probe_cost for k in keys),
    )
    per_currency: dict[str, list[BilledPrice]] = defaultdict(list)
    for prices in billed.values():
        for b in prices:
            per_currency[b.currency].append(b)
    costs = [CurrencyCost(currency=c, requests=sum(b.requests for b in bs), cost=math.fsum(b.cost for b in bs))
             for c, bs in sorted(per_currency.items())]
    return UsageByKey(currency=_one_currency(set(per_currency)), cost_by_currency=costs,
                      since=since and as_utc(since), until=until and as_utc(until), keys=keys, total=total,
                      refused_without_key=dict(refused.get(None, {})) if key is None else {})


@router.get("/timeseries", response_model=UsageSeries,
            responses={400: {"model": ErrorMessage}, 404: {"model": ErrorMessage}},
            summary="GFLOPs, cost, requests and images per key and time bucket")
def usage_timeseries(session: SessionDep, bucket: Bucket = Bucket.minute,
                     since: SinceQuery = None, until: UntilQuery = None, key: KeyQuery = None) -> UsageSeries:
    """Per key, the usage in each `bucket` (minute, hour or day, UTC) of [since, until). Default window: the last 6
    hours by minute, the last 7 days by hour, the last 90 days by day. Buckets before the first usage in the window
    are left out; later empty buckets are zeros."""
    _check_window(since, until)
    _unknown_key(session, key)
    width = BUCKET_SECONDS[bucket]
    end = as_utc(until) if until is not None else datetime.now(timezone.utc)
    start = as_utc(since) if since is not None else end - DEFAULT_WINDOW[bucket]
    if start >= end:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "`since` must be before `until`")
    cells = queries.usage_by_bucket(session, width_s=width, since=start, until=end, key_name=key)
    timestamps: list[int] = []
    if cells:
        first = min(c.start_epoch for c in cells)
        last = max(max(c.start_epoch for c in cells), math.ceil(end.timestamp()) - 1) // width * width
        count = (last - first) // width + 1
        if count > MAX_BUCKETS:
            raise HTTPException(status.HTTP_400_BAD_REQUEST,
                                f"the window holds {count} {bucket.value} buckets, more than {MAX_BUCKETS}: "
                                "shorten it (since/until) or use a coarser bucket")
        timestamps = list(range(first, last + 1, width))
    index = {t: i for i, t in enumerate(timestamps)}
    by_key: dict[str, KeySeries] = {}
    for c in cells:
        s = by_key.get(c.key)
        if s is None:
            n = len(timestamps)
            s = by_key[c.key] = KeySeries(key=c.key, requests=[0] * n, images=[0] * n, gflops=[0.0] * n,
                                          full_gflops=[0.0] * n, cost=[0.0] * n)
        i = index[c.start_epoch]
        s.requests[i], s.images[i], s.gflops[i], s.full_gflops[i], s.cost[i] = (
            c.requests, c.images, c.gflops, c.full_gflops, c.cost)
    currencies = {currency_name(b.currency) for b in reports.billed_prices(session, since=start, until=end,
                                                                                key_name=key)}
    return UsageSeries(bucket=bucket, bucket_seconds=width, currency=_one_currency(currencies), since=start, until=end,
                       timestamps=timestamps, series=[by_key[k] for k in sorted(by_key)])


@router.get("/daily", response_model=DailyUsage, responses={400: {"model": ErrorMessage}, 404: {"model": ErrorMessage}},
            summary="Usage per UTC day, key, currency and price; refused calls per day, key and reason")
def usage_daily(session: SessionDep, since: SinceQuery = None, until: UntilQuery = None,
                key: KeyQuery = None) -> DailyUsage:
    """The ledger's rows in [since, until) (default: all time) summed per UTC day, key and the price and currency
    they were billed at; and the refusal counters of the days the window touches."""
    _check_window(since, until)
    _unknown_key(session, key)
    days = [DayUsage(day=d.day, key=d.key, currency=currency_name(d.currency), price_per_gflop=d.price_per_gflop,
                     requests=d.requests, images=d.images, tokens=d.tokens, gflops=d.gflops,
                     full_gflops=d.full_gflops, cost=d.cost, probe_requests=d.probe_requests,
                     probe_gflops=d.probe_gflops, probe_cost=d.probe_cost)
            for d in reports.usage_by_day(session, since=since, until=until, key_name=key)]
    refusals = [DayRefusals(day=r.day, key=r.key, reason=r.reason, count=r.count)
                for r in reports.refusals_by_day(session, since=since, until=until, key_name=key)]
    return DailyUsage(since=since and as_utc(since), until=until and as_utc(until), days=days, refusals=refusals)


@router.get("/daily.csv", response_class=Response, responses={
    200: {"content": {"text/csv": {}}, "description": "one line per UTC day, key, currency and price"},
    400: {"model": ErrorMessage}, 404: {"model": ErrorMessage}}, summary="Usage per UTC day as CSV")
def usage_daily_csv(session: SessionDep, since: SinceQuery = None, until: UntilQuery = None,
                    key: KeyQuery = None) -> Response:
    """The rows of /api/usage/daily as CSV with a header: day, key, currency, price_per_gflop, requests, images,
    tokens, gflops, full_gflops, cost, probe_requests, probe_gflops, probe_cost (floats written exactly;
    `teacher-server usage --csv` writes the same)."""
    _check_window(since, until)
    _unknown_key(session, key)
    out = io.StringIO()
    reports.write_usage_csv(reports.usage_by_day(session, since=since, until=until, key_name=key), out)
    return Response(out.getvalue(), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": 'attachment; filename="maskedkd-usage-daily.csv"'})


def _figures(key: str, rows: list[queries.RecentRequest]) -> LatencyFigures:
    if not rows:
        return LatencyFigures(key=key, requests=0, latency_ms_p50=None, latency_ms_p95=None, latency_ms_max=None,
                              queue_ms_p50=None, queue_ms_p95=None, images_per_request_mean=None,
                              batch_images_mean=None, batch_images_p50=None, batch_images_max=None)
    latency = [r.latency_ms for r in rows]
    queue = [r.queue_ms for r in rows]
    batch = [float(r.batch_images) for r in rows]
    return LatencyFigures(
        key=key, requests=len(rows), latency_ms_p50=queries.percentile(latency, 50),
        latency_ms_p95=queries.percentile(latency, 95), latency_ms_max=max(latency),
        queue_ms_p50=queries.percentile(queue, 50), queue_ms_p95=queries.percentile(queue, 95),
        images_per_request_mean=sum(r.images for r in rows) / len(rows), batch_images_mean=sum(batch) / len(batch),
        batch_images_p50=queries.percentile(batch, 50), batch_images_max=max(r.batch_images for r in rows),
    )


@router.get("/latency", response_model=RecentLatency, responses={404: {"model": ErrorMessage}},
            summary="Latency, queueing and micro-batch sizes of the most recent requests")
def recent_latency(session: SessionDep, limit: Annotated[int, Query(ge=1, le=100_000)] = 1000,
                   since: SinceQuery = None, key: KeyQuery = None) -> RecentLatency:
    """Percentiles (linear interpolation) over the last `limit` requests, overall and per key."""
    _unknown_key(session, key)
    rows = queries.recent_requests(session, limit=limit, since=since, key_name=key)
    per_key: dict[str, list[queries.RecentRequest]] = {}
    for r in rows:
        per_key.setdefault(r.key, []).append(r)
    return RecentLatency(window_requests=limit, since=since and as_utc(since), overall=_figures("*", rows),
                         keys=[_figures(k, per_key[k]) for k in sorted(per_key)])
