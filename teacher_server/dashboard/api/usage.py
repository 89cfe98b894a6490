"""GET /api/usage/...: totals per key (with what probe requests cost), time series per key and bucket, usage and
refusals per day (JSON and CSV), recent latency and batch sizes (read-only). Prices and currencies are those stored
with the usage rows."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, status
from fastapi.responses import Response

from teacher_server.dashboard.access import require_viewer
from teacher_server.dashboard.deps import SessionDep
from teacher_server.dashboard.schemas import Bucket, ErrorMessage, KeySeries, LatencyFigures, RecentLatency, UsageSeries
from teacher_server.ledger import report_series, reports, usage_report
from teacher_server.ledger.models import UnknownKeyNameError, as_utc
from teacher_server.ledger.usage_report import DailyUsage, UsageByKey, one_currency

router = APIRouter(
    prefix="/api/usage",
    tags=["usage"],
    dependencies=[Depends(require_viewer)],
    responses={
        401: {"model": ErrorMessage, "description": "missing or wrong viewer token"},
        403: {"model": ErrorMessage, "description": "read views locked (no token configured)"},
    },
)

BUCKET_SECONDS = {Bucket.minute: 60, Bucket.hour: 3600, Bucket.day: report_series.DAY_S}
DEFAULT_WINDOW = {Bucket.minute: timedelta(hours=6), Bucket.hour: timedelta(days=7), Bucket.day: timedelta(days=90)}
MAX_BUCKETS = 2000  # per series response; more asks for a coarser bucket or a shorter window

SinceQuery = Annotated[datetime | None, Query(description="ISO 8601 start (inclusive); naive means UTC")]
UntilQuery = Annotated[datetime | None, Query(description="ISO 8601 end (exclusive); naive means UTC")]
# no NUL: Postgres text cannot hold it, so such a name can match no key (422, not a database error)
KeyQuery = Annotated[
    str | None, Query(max_length=200, pattern=r"^[^\x00]*$", description="only this API key (by name)")
]
_QUERY_ERRORS: dict[int | str, dict[str, Any]] = {400: {"model": ErrorMessage}, 404: {"model": ErrorMessage}}


def _usage_route(path: str, model: type, summary: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """GET `path`, answering `model`: usage in a window [since, until), of one key or all (400, 404: `_check_query`)."""
    return router.get(path, response_model=model, responses=_QUERY_ERRORS, summary=summary)


def _check_window(since: datetime | None, until: datetime | None) -> None:
    if since is not None and until is not None and as_utc(since) >= as_utc(until):
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "`since` must be before `until`")


def _check_query(session: SessionDep, since: datetime | None, until: datetime | None, key: str | None) -> None:
    """400 for a window that ends before it starts, 404 for a key name no key has."""
    _check_window(since, until)
    _unknown_key(session, key)


def _unknown_key(session: SessionDep, key: str | None) -> None:
    try:
        reports.check_key_exists(session, key_name=key)
    except UnknownKeyNameError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc


@_usage_route("/keys", UsageByKey, "Usage totals per API key")
def usage_by_key(
    session: SessionDep, since: SinceQuery = None, until: UntilQuery = None, key: KeyQuery = None
) -> UsageByKey:
    """Requests, images, GFLOPs used, GFLOPs a full teacher would have used, saving, cost and the prices billed per
    key, in a window (default: all time), plus the total over all keys and the calls refused."""
    _check_query(session, since, until, key)
    return usage_report.usage_by_key(session, since=since, until=until, key_name=key)


@_usage_route("/timeseries", UsageSeries, "GFLOPs, cost, requests and images per key and time bucket")
def usage_timeseries(
    session: SessionDep,
    bucket: Bucket = Bucket.minute,
    since: SinceQuery = None,
    until: UntilQuery = None,
    key: KeyQuery = None,
) -> UsageSeries:
    """Per key, the usage in each `bucket` (minute, hour or day, UTC) of [since, until). Default window: the last 6
    hours by minute, the last 7 days by hour, the last 90 days by day. Buckets before the first usage in the window
    are left out; later empty buckets are zeros."""
    _check_query(session, since, until, key)
    width = BUCKET_SECONDS[bucket]
    end = as_utc(until) if until is not None else datetime.now(UTC)
    start = as_utc(since) if since is not None else end - DEFAULT_WINDOW[bucket]
    if start >= end:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "`since` must be before `until`")
    cells = report_series.usage_by_bucket(session, width_s=width, since=start, until=end, key_name=key)
    timestamps: list[int] = []
    if cells:
        first = min(c.start_epoch for c in cells)
        last = max(max(c.start_epoch for c in cells), math.ceil(end.timestamp()) - 1) // width * width
        count = (last - first) // width + 1
        if count > MAX_BUCKETS:
            raise HTTPException(
                status.HTTP_400_BAD_REQUEST,
                f"the window holds {count} {bucket.value} buckets, more than {MAX_BUCKETS}: "
                "shorten it (since/until) or use a coarser bucket",
            )
        timestamps = list(range(first, last + 1, width))
    index = {t: i for i, t in enumerate(timestamps)}
    by_key: dict[str, KeySeries] = {}
    for c in cells:
        s = by_key.get(c.key)
        if s is None:
            n = len(timestamps)
            s = by_key[c.key] = KeySeries(
                key=c.key, requests=[0] * n, images=[0] * n, gflops=[0.0] * n, full_gflops=[0.0] * n, cost=[0.0] * n
            )
        i = index[c.start_epoch]
        s.requests[i], s.images[i], s.gflops[i], s.full_gflops[i], s.cost[i] = (
            c.requests,
            c.images,
            c.gflops,
            c.full_gflops,
            c.cost,
        )
    currencies = (b.currency for b in reports.billed_prices(session, since=start, until=end, key_name=key))
    return UsageSeries(
        bucket=bucket,
        bucket_seconds=width,
        currency=one_currency(currencies),
        since=start,
        until=end,
        timestamps=timestamps,
        series=[by_key[k] for k in sorted(by_key)],
    )


@_usage_route("/daily", DailyUsage, "Usage per UTC day, key, currency and price; refused calls per day, key and reason")
def usage_daily(
    session: SessionDep, since: SinceQuery = None, until: UntilQuery = None, key: KeyQuery = None
) -> DailyUsage:
    """The ledger's rows in [since, until) (default: all time) summed per UTC day, key and the price and currency
    they were billed at; and the refusal counters of the days the window touches."""
    _check_query(session, since, until, key)
    return usage_report.daily_usage(session, since=since, until=until, key_name=key)


@router.get(
    "/daily.csv",
    response_class=Response,
    responses={
        200: {"content": {"text/csv": {}}, "description": "one line per UTC day, key, currency and price"},
        **_QUERY_ERRORS,
    },
    summary="Usage per UTC day as CSV",
)
def usage_daily_csv(
    session: SessionDep, since: SinceQuery = None, until: UntilQuery = None, key: KeyQuery = None
) -> Response:
    """The rows of /api/usage/daily as CSV with a header: day, key, currency, price_per_gflop, requests, images,
    tokens, gflops, full_gflops, cost, probe_requests, probe_gflops, probe_cost (floats written exactly;
    `teacher-server usage --csv` writes the same)."""
    _check_query(session, since, until, key)
    out = io.StringIO()
    usage_report.write_usage_csv(report_series.usage_by_day(session, since=since, until=until, key_name=key), out)
    return Response(
        out.getvalue(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="maskedkd-usage-daily.csv"'},
    )


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default); nan if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _figures(key: str, rows: list[report_series.RecentRequest]) -> LatencyFigures:
    if not rows:
        return LatencyFigures(
            key=key,
            requests=0,
            latency_ms_p50=None,
            latency_ms_p95=None,
            latency_ms_max=None,
            queue_ms_p50=None,
            queue_ms_p95=None,
            images_per_request_mean=None,
            batch_images_mean=None,
            batch_images_p50=None,
            batch_images_max=None,
        )
    latency = [r.latency_ms for r in rows]
    queue = [r.queue_ms for r in rows]
    batch = [float(r.batch_images) for r in rows]
    return LatencyFigures(
        key=key,
        requests=len(rows),
        latency_ms_p50=percentile(latency, 50),
        latency_ms_p95=percentile(latency, 95),
        latency_ms_max=max(latency),
        queue_ms_p50=percentile(queue, 50),
        queue_ms_p95=percentile(queue, 95),
        images_per_request_mean=sum(r.images for r in rows) / len(rows),
        batch_images_mean=sum(batch) / len(batch),
        batch_images_p50=percentile(batch, 50),
        batch_images_max=max(r.batch_images for r in rows),
    )


@router.get(
    "/latency",
    response_model=RecentLatency,
    responses={404: {"model": ErrorMessage}},
    summary="Latency, queueing and micro-batch sizes of the most recent requests",
)
def recent_latency(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100_000)] = 1000,
    since: SinceQuery = None,
    key: KeyQuery = None,
) -> RecentLatency:
    """Percentiles (linear interpolation) over the last `limit` requests, overall and per key."""
    _unknown_key(session, key)
    rows = report_series.recent_requests(session, limit=limit, since=since, key_name=key)
    per_key: dict[str, list[report_series.RecentRequest]] = {}
    for r in rows:
        per_key.setdefault(r.key, []).append(r)
    return RecentLatency(
        window_requests=limit,
        since=since and as_utc(since),
        overall=_figures("*", rows),
        keys=[_figures(k, per_key[k]) for k in sorted(per_key)],
    )
