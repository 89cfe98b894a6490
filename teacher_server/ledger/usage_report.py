"""The usage reports, assembled from the queries of reports.py and report_series.py: totals per key with the prices
billed, what each purpose cost and the calls refused (`usage_by_key`), and usage and refusals per UTC day
(`daily_usage`, and its CSV).

One set of types for every reader: `teacher-server usage --json` prints the `keys` of a UsageByKey and the dashboard's
/api/usage/keys answers the whole of it, both serialized by pydantic from these dataclasses, so the two agree field
for field on the same ledger; the page reads the same JSON.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TextIO

from sqlalchemy.orm import Session

from maskedkd.purpose import PROBE
from teacher_server.ledger.models import as_utc
from teacher_server.ledger.report_series import DayRefusals, DayUsage, refusals_by_day, usage_by_day
from teacher_server.ledger.reports import (
    DOCUMENTED,
    BilledPrice,
    PurposeUsage,
    billed_prices,
    check_key_exists,
    usage_by_purpose,
    usage_totals,
)


def saving_pct(gflops: float, full_gflops: float) -> float:
    """Share of the full teacher's GFLOPs the masked forwards saved, in percent (0 without usage)."""
    if full_gflops <= 0 or math.isnan(full_gflops):
        return 0.0
    return 100.0 * (1.0 - gflops / full_gflops)


@dataclass(frozen=True, kw_only=True)
class UsageTotals:
    __pydantic_config__ = DOCUMENTED

    requests: int
    """billed requests (a replayed retry is not a new request)"""
    images: int
    tokens: int
    """teacher tokens processed, prefix tokens included"""
    gflops: float
    """GFLOPs of the masked forwards billed (2 FLOPs per multiply-add)"""
    full_gflops: float
    """GFLOPs the full, unmasked teacher would have used for the same images"""
    saved_gflops: float
    """full_gflops - gflops"""
    saving_pct: float
    """100 * saved_gflops / full_gflops; 0 without usage"""
    cost: float
    """amount billed, in the currencies of `billed` (or `cost_by_currency`)"""
    probe_requests: int = 0
    """the part of `requests` sent with purpose 'probe' (the fidelity probes of the student client's `--keep auto`)"""
    probe_gflops: float = 0.0
    """the part of `gflops` billed for probe requests"""
    probe_cost: float = 0.0
    """the part of `cost` billed for probe requests"""


@dataclass(frozen=True, kw_only=True)
class KeyUsage(UsageTotals):
    __pydantic_config__ = DOCUMENTED

    key: str
    """the key's name"""
    key_prefix: str
    """first characters of the secret, for recognising a key"""
    disabled: bool
    created_at: datetime
    quota_gflops: float | None
    """GFLOP quota; null: unlimited"""
    price_per_gflop: float | None
    """the key's own price for new requests; null: the serving server's default"""
    currency: str | None
    """the currency its rows were billed in; null: none billed, or several (see `billed`)"""
    billed: list[BilledPrice]
    """the prices and currencies its rows were billed at"""
    by_purpose: list[PurposeUsage]
    """its rows per purpose and currency"""
    refused: dict[str, int]
    """calls refused per reason (auth, quota, rate_limit, invalid) on the UTC days the window touches"""
    quota_used_pct: float | None
    """lifetime GFLOPs used / quota in percent; null: unlimited"""
    last_used_at: datetime | None


@dataclass(frozen=True)
class CurrencyCost:
    __pydantic_config__ = DOCUMENTED

    currency: str
    """'unknown' for rows billed before the currency was recorded"""
    requests: int
    cost: float


@dataclass(frozen=True)
class UsageByKey:
    """Every key (or one) with its usage in a window (all time when since and until are null)."""

    __pydantic_config__ = DOCUMENTED

    currency: str | None
    """the one currency the window's rows were billed in; null: none billed, or several (see `cost_by_currency`;
    `total.cost` then mixes them)"""
    cost_by_currency: list[CurrencyCost]
    since: datetime | None
    until: datetime | None
    keys: list[KeyUsage]
    total: UsageTotals
    refused_without_key: dict[str, int]
    """calls refused before a key was known (missing or wrong key, bad input), per reason; empty for one key"""


def one_currency(currencies: Iterable[str]) -> str | None:
    """The currency when there is exactly one, else None."""
    distinct = set(currencies)
    return next(iter(distinct)) if len(distinct) == 1 else None


def _probe_part(purposes: list[PurposeUsage]) -> dict[str, Any]:
    probes = [p for p in purposes if p.purpose == PROBE]
    return {
        "probe_requests": sum(p.requests for p in probes),
        "probe_gflops": math.fsum(p.gflops for p in probes),
        "probe_cost": math.fsum(p.cost for p in probes),
    }


def _total(keys: list[KeyUsage]) -> UsageTotals:
    gflops, full = math.fsum(k.gflops for k in keys), math.fsum(k.full_gflops for k in keys)
    return UsageTotals(
        requests=sum(k.requests for k in keys),
        images=sum(k.images for k in keys),
        tokens=sum(k.tokens for k in keys),
        gflops=gflops,
        full_gflops=full,
        saved_gflops=full - gflops,
        saving_pct=saving_pct(gflops, full),
        cost=math.fsum(k.cost for k in keys),
        probe_requests=sum(k.probe_requests for k in keys),
        probe_gflops=math.fsum(k.probe_gflops for k in keys),
        probe_cost=math.fsum(k.probe_cost for k in keys),
    )


def _cost_by_currency(billed: Iterable[BilledPrice]) -> list[CurrencyCost]:
    per_currency: dict[str, list[BilledPrice]] = defaultdict(list)
    for b in billed:
        per_currency[b.currency].append(b)
    return [
        CurrencyCost(currency=c, requests=sum(b.requests for b in bs), cost=math.fsum(b.cost for b in bs))
        for c, bs in sorted(per_currency.items())
    ]


def usage_by_key(
    session: Session, *, since: datetime | None = None, until: datetime | None = None, key_name: str | None = None
) -> UsageByKey:
    """Every key (or only `key_name`; UnknownKeyNameError when no key has it) with its totals in [since, until),
    the prices billed, the totals per purpose and the calls refused; and the total over the keys."""
    totals = usage_totals(session, since=since, until=until, key_name=key_name)
    billed: dict[str, list[BilledPrice]] = defaultdict(list)
    for b in billed_prices(session, since=since, until=until, key_name=key_name):
        billed[b.key].append(b)
    purposes: dict[str, list[PurposeUsage]] = defaultdict(list)
    for p in usage_by_purpose(session, since=since, until=until, key_name=key_name):
        purposes[p.key].append(p)
    refused: dict[str | None, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in refusals_by_day(session, since=since, until=until, key_name=key_name):
        refused[r.key][r.reason] += r.count
    lifetime = {t.name: t.gflops for t in totals}
    if since is not None or until is not None:
        lifetime = {t.name: t.gflops for t in usage_totals(session, key_name=key_name)}
    keys = []
    for t in totals:
        quota_pct: float | None = None
        if t.quota_gflops is not None:  # a zero quota is spent from the start
            quota_pct = 100.0 * lifetime[t.name] / t.quota_gflops if t.quota_gflops > 0 else 100.0
        keys.append(
            KeyUsage(
                key=t.name,
                key_prefix=t.key_prefix,
                disabled=t.disabled,
                created_at=t.created_at,
                quota_gflops=t.quota_gflops,
                price_per_gflop=t.price_per_gflop,
                currency=one_currency(b.currency for b in billed[t.name]),
                billed=billed[t.name],
                by_purpose=purposes[t.name],
                refused=dict(refused.get(t.name, {})),
                quota_used_pct=quota_pct,
                last_used_at=t.last_used_at,
                requests=t.requests,
                images=t.images,
                tokens=t.tokens,
                gflops=t.gflops,
                full_gflops=t.full_gflops,
                saved_gflops=t.full_gflops - t.gflops,
                saving_pct=saving_pct(t.gflops, t.full_gflops),
                cost=t.cost,
                **_probe_part(purposes[t.name]),
            )
        )
    costs = _cost_by_currency(b for prices in billed.values() for b in prices)
    return UsageByKey(
        currency=one_currency(c.currency for c in costs),
        cost_by_currency=costs,
        since=since and as_utc(since),
        until=until and as_utc(until),
        keys=keys,
        total=_total(keys),
        refused_without_key=dict(refused.get(None, {})),
    )


@dataclass(frozen=True)
class DailyUsage:
    since: datetime | None
    until: datetime | None
    days: list[DayUsage]
    refusals: list[DayRefusals]


def daily_usage(
    session: Session, *, since: datetime | None = None, until: datetime | None = None, key_name: str | None = None
) -> DailyUsage:
    """The rows in [since, until) summed per UTC day, key, currency and price, and the refusal counters of the days
    the window touches (only `key_name`'s when given; UnknownKeyNameError when no key has it)."""
    check_key_exists(session, key_name=key_name)
    return DailyUsage(
        since=since and as_utc(since),
        until=until and as_utc(until),
        days=usage_by_day(session, since=since, until=until, key_name=key_name),
        refusals=refusals_by_day(session, since=since, until=until, key_name=key_name),
    )


CSV_COLUMNS = (
    "day",
    "key",
    "currency",
    "price_per_gflop",
    "requests",
    "images",
    "tokens",
    "gflops",
    "full_gflops",
    "cost",
    "probe_requests",
    "probe_gflops",
    "probe_cost",
)


def write_usage_csv(rows: Iterable[DayUsage], out: TextIO) -> None:
    """One line per (UTC day, key, currency, price); floats in repr form, so the sums read back exactly. The probe_*
    columns are the part of the line's requests, GFLOPs and cost requested with purpose 'probe'."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        writer.writerow(
            [
                r.day.isoformat(),
                r.key,
                r.currency,
                "" if r.price_per_gflop is None else repr(r.price_per_gflop),
                r.requests,
                r.images,
                r.tokens,
                repr(r.gflops),
                repr(r.full_gflops),
                repr(r.cost),
                r.probe_requests,
                repr(r.probe_gflops),
                repr(r.probe_cost),
            ]
        )
