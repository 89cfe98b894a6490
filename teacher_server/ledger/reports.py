"""The ledger's usage queries per key, one function per question, each returning rows of its own dataclass: totals
per key, the prices and currencies each key was billed at, and usage per purpose (training targets '' and the client's
`probe` requests apart); and the query building they share with report_series.py (the same usage over time).
usage_report.py assembles them into the reports `teacher-server usage` and the dashboard show.

Money is reported as billed: the price and currency come from the usage rows, never from the server's current
settings; rows billed before revision 0003 have no recorded currency and are reported as UNKNOWN_CURRENCY.
Columns are read by label, never by position. All functions take a `Session` and keyword-only arguments and work on
SQLite and Postgres. The dataclasses that appear in the dashboard's JSON document their fields with attribute
docstrings, which pydantic turns into the API's field descriptions.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Result, Select, and_, func, select
from sqlalchemy.orm import Session

from teacher_server.ledger.models import ApiKey, KeyCounter, UnknownKeyNameError, UsageRecord, as_utc

UNKNOWN_CURRENCY = "unknown"  # how reports name the currency of rows billed before it was recorded
DOCUMENTED = {"use_attribute_docstrings": True}  # pydantic: a field's docstring is its description in the API
AnySelect = TypeVar("AnySelect", bound=Select[*tuple[Any, ...]])


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


def check_key_exists(session: Session, *, key_name: str | None) -> None:
    """UnknownKeyNameError when `key_name` is given and no key has it (a report of such a key would read as empty)."""
    if key_name is not None and session.scalar(select(ApiKey.id).where(ApiKey.name == key_name)) is None:
        raise UnknownKeyNameError(f"no API key named {key_name!r}")


def of_key(stmt: AnySelect, key_name: str | None) -> AnySelect:
    return stmt if key_name is None else stmt.where(ApiKey.name == key_name)


def usage_of_keys(*columns: Any, since: datetime | None, until: datetime | None) -> Select[*tuple[Any, ...]]:
    """SELECT columns FROM usage rows in [since, until) joined with their keys."""
    return (
        select(*columns)
        .select_from(UsageRecord)
        .join(ApiKey, ApiKey.id == UsageRecord.api_key_id)
        .where(*usage_window(since=since, until=until))
    )


USAGE_SUMS = ("images", "tokens", "gflops", "full_gflops", "cost")  # what each usage row adds up
_INT_SUMS = frozenset({"requests", "images", "tokens", "probe_requests"})  # the other sums are floats


def sum_columns(*columns: str, zero_when_empty: bool = False) -> list[Any]:
    """The row count labelled "requests", then the sum of each named UsageRecord column labelled with its name
    (0 instead of NULL for a group without usage rows when `zero_when_empty`)."""
    sums: list[Any] = [func.count(UsageRecord.id).label("requests")]
    for name in columns:
        total: Any = func.sum(getattr(UsageRecord, name))
        if zero_when_empty:
            total = func.coalesce(total, 0 if name in _INT_SUMS else 0.0)
        sums.append(total.label(name))
    return sums


def sum_values(row: Any, *labels: str) -> dict[str, Any]:
    """The labelled sums of a result row as ints (counts, images, tokens) or floats (GFLOPs, cost), None as 0."""
    return {label: (int if label in _INT_SUMS else float)(getattr(row, label) or 0) for label in labels}


def usage_groups(
    session: Session,
    groups: tuple[Any, ...],
    sums: list[Any],
    order_by: tuple[Any, ...],
    *,
    since: datetime | None,
    until: datetime | None,
    key_name: str | None,
) -> Result[Any]:
    """The usage rows in [since, until) (of the key `key_name` when given) grouped by the columns `groups`, in the
    order `order_by`: per group the `groups` columns, then the `sums` (aggregate columns, such as `sum_columns`)."""
    stmt = usage_of_keys(*groups, *sums, since=since, until=until).group_by(*groups).order_by(*order_by)
    return session.execute(of_key(stmt, key_name))


def currency_name(currency: str | None) -> str:
    return UNKNOWN_CURRENCY if currency is None else currency


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


def usage_totals(
    session: Session, *, key_name: str | None = None, since: datetime | None = None, until: datetime | None = None
) -> list[KeyTotals]:
    """Every key (also those without usage) with the totals of its rows in [since, until), ordered by name;
    only `key_name` when given (UnknownKeyNameError when no key has that name)."""
    check_key_exists(session, key_name=key_name)
    stmt = (
        select(
            ApiKey.name,
            ApiKey.key_prefix,
            ApiKey.disabled,
            ApiKey.created_at,
            ApiKey.quota_gflops,
            ApiKey.price_per_gflop,
            *sum_columns(*USAGE_SUMS, zero_when_empty=True),
            func.max(UsageRecord.created_at).label("last_used_at"),
        )
        .select_from(ApiKey)
        .outerjoin(UsageRecord, and_(UsageRecord.api_key_id == ApiKey.id, *usage_window(since=since, until=until)))
        .group_by(
            ApiKey.id,
            ApiKey.name,
            ApiKey.key_prefix,
            ApiKey.disabled,
            ApiKey.created_at,
            ApiKey.quota_gflops,
            ApiKey.price_per_gflop,
        )
        .order_by(ApiKey.name)
    )
    totals = []
    for r in session.execute(of_key(stmt, key_name)):
        last_used = r.last_used_at
        if isinstance(last_used, str):  # SQLite returns max() of a DATETIME column as its stored text
            last_used = datetime.fromisoformat(last_used)
        totals.append(
            KeyTotals(
                name=r.name,
                key_prefix=r.key_prefix,
                disabled=bool(r.disabled),
                created_at=as_utc(r.created_at),
                quota_gflops=r.quota_gflops,
                price_per_gflop=r.price_per_gflop,
                **sum_values(r, "requests", *USAGE_SUMS),
                last_used_at=as_utc(last_used) if last_used else None,
            )
        )
    return totals


@dataclass(frozen=True)
class BilledPrice:
    """The rows of one key billed at one price in one currency (as stored with each row, not the server's
    settings)."""

    __pydantic_config__ = DOCUMENTED

    key: str
    price_per_gflop: float | None
    """null: not recoverable (rows from before revision 0003 without GFLOPs)"""
    currency: str
    """'unknown' for rows billed before the currency was recorded (revision 0003)"""
    requests: int
    gflops: float
    cost: float


def billed_prices(
    session: Session, *, since: datetime | None = None, until: datetime | None = None, key_name: str | None = None
) -> list[BilledPrice]:
    """Per key, the distinct (price, currency) its rows in [since, until) were billed at, ordered by key."""
    prices = (ApiKey.name.label("key"), UsageRecord.price_per_gflop, UsageRecord.currency)
    order = (ApiKey.name, UsageRecord.currency, UsageRecord.price_per_gflop)
    rows = usage_groups(
        session, prices, sum_columns("gflops", "cost"), order, since=since, until=until, key_name=key_name
    )
    return [
        BilledPrice(
            key=r.key,
            price_per_gflop=r.price_per_gflop,
            currency=currency_name(r.currency),
            **sum_values(r, "requests", "gflops", "cost"),
        )
        for r in rows
    ]


@dataclass(frozen=True)
class PurposeUsage:
    """The rows of one key requested for one purpose, billed in one currency."""

    __pydantic_config__ = DOCUMENTED

    key: str
    purpose: str
    """InferRequest.purpose: '' for training targets, 'probe' for `--keep auto` probes, or another label the client
    chose"""
    currency: str
    """'unknown' for rows billed before the currency was recorded"""
    requests: int
    images: int
    tokens: int
    gflops: float
    full_gflops: float
    cost: float


def usage_by_purpose(
    session: Session, *, since: datetime | None = None, until: datetime | None = None, key_name: str | None = None
) -> list[PurposeUsage]:
    """Per key, the totals of its rows in [since, until) per (purpose, currency), ordered by key and purpose."""
    purposes = (ApiKey.name.label("key"), UsageRecord.purpose, UsageRecord.currency)
    order = (ApiKey.name, UsageRecord.purpose, UsageRecord.currency)
    rows = usage_groups(session, purposes, sum_columns(*USAGE_SUMS), order, since=since, until=until, key_name=key_name)
    return [
        PurposeUsage(
            key=r.key, purpose=r.purpose, currency=currency_name(r.currency), **sum_values(r, "requests", *USAGE_SUMS)
        )
        for r in rows
    ]
