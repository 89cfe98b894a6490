"""`teacher-server usage`: totals per key as a table or as JSON, with the prices billed, what each purpose cost
(the client's `probe` requests beside the training targets) and the calls refused. The CSV is
reports.write_usage_csv (the same bytes as the dashboard's /api/usage/daily.csv)."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from maskedkd.purpose import PROBE
from teacher_server.ledger import reports
from teacher_server.ledger.reports import BilledPrice, PurposeUsage, currency_name


@dataclass
class KeyReport:
    totals: reports.KeyTotals
    billed: list[BilledPrice] = field(default_factory=list)
    purposes: list[PurposeUsage] = field(default_factory=list)   # per (purpose, currency); '' = training targets
    refused: dict[str, int] = field(default_factory=dict)         # per reason


@dataclass
class UsageReport:
    keys: list[KeyReport]
    refused_without_key: dict[str, int]   # per reason, refused before a key was known


def read_usage_report(session: Session, *, key_name: str | None = None) -> UsageReport:
    """Every key (or only `key_name`; UnknownKeyNameError when none has it) with its totals over all time."""
    keys = {t.name: KeyReport(t) for t in reports.usage_totals(session, key_name=key_name)}
    for b in reports.billed_prices(session, key_name=key_name):
        keys[b.key].billed.append(b)
    for p in reports.usage_by_purpose(session, key_name=key_name):
        keys[p.key].purposes.append(p)
    refused: dict[str | None, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in reports.refusals_by_day(session, key_name=key_name):
        refused[r.key][r.reason] += r.count
    for name, counts in refused.items():
        if name in keys:
            keys[name].refused = dict(counts)
    return UsageReport(list(keys.values()), dict(refused.get(None, {})))


def report_json(report: UsageReport) -> list[dict[str, Any]]:
    """One entry per key; "billed", "by_purpose" and "refused" only where there is some (the entry of an unused key
    is unchanged), and an entry with key null for calls refused before a key was known."""
    entries: list[dict[str, Any]] = []
    for k in report.keys:
        t = k.totals
        entry: dict[str, Any] = {"key": t.name, "requests": t.requests, "images": t.images, "tokens": t.tokens,
                                 "gflops": t.gflops, "full_gflops": t.full_gflops, "saving_pct": t.saving_pct,
                                 "cost": t.cost}
        if k.billed:
            entry["billed"] = [{"price_per_gflop": b.price_per_gflop, "currency": currency_name(b.currency),
                                "requests": b.requests, "gflops": b.gflops, "cost": b.cost} for b in k.billed]
        if k.purposes:
            entry["by_purpose"] = [{"purpose": p.purpose, "currency": currency_name(p.currency),
                                    "requests": p.requests, "images": p.images, "tokens": p.tokens,
                                    "gflops": p.gflops, "full_gflops": p.full_gflops, "cost": p.cost}
                                   for p in k.purposes]
        if k.refused:
            entry["refused"] = k.refused
        entries.append(entry)
    if report.refused_without_key:
        entries.append({"key": None, "refused": report.refused_without_key})
    return entries


def _costs(parts: list[Any]) -> str:
    """Costs as billed, one currency at a time: "0.00001234 USD + 0.00000100 EUR" (or 0)."""
    per: dict[str, float] = defaultdict(float)
    for p in parts:
        per[currency_name(p.currency)] += p.cost
    return " + ".join(f"{c:.8f} {cur}" for cur, c in sorted(per.items())) or f"{0.0:.8f}"


def _probes(k: KeyReport) -> tuple[str, str]:
    """(probe GFLOPs with their share of the key's GFLOPs, probe cost as billed)."""
    probes = [p for p in k.purposes if p.purpose == PROBE]
    gflops = sum(p.gflops for p in probes)
    share = 100.0 * gflops / k.totals.gflops if k.totals.gflops > 0 else 0.0
    return f"{gflops:.6f} ({share:.1f}%)", _costs(probes)


def report_lines(report: UsageReport) -> list[str]:
    """The table: one line per key (and one for calls refused before a key was known)."""
    lines = [f"{'KEY':24} {'REQUESTS':>9} {'IMAGES':>9} {'GFLOPS':>14} {'FULL_GFLOPS':>14} {'SAVING':>8} "
             f"{'COST (AS BILLED)':>20} {'PROBE_GFLOPS (SHARE)':>22} {'PROBE_COST':>20}  {'PRICE/GFLOP':12} REFUSED"]
    for k in report.keys:
        t = k.totals
        prices = ", ".join(sorted({f"{_fmt_num(b.price_per_gflop)} {currency_name(b.currency)}"
                                   for b in k.billed})) or "-"
        probe_gflops, probe_cost = _probes(k)
        lines.append(f"{t.name:24} {t.requests:>9} {t.images:>9} {t.gflops:>14.6f} {t.full_gflops:>14.6f} "
                     f"{t.saving_pct:>7.2f}% {_costs(k.billed):>20} {probe_gflops:>22} {probe_cost:>20}  "
                     f"{prices:12} {refused_text(k.refused)}")
    if report.refused_without_key:
        lines.append(f"{'(no key known)':24} {'':>9} {'':>9} {'':>14} {'':>14} {'':>8} {'':>20} {'':>22} {'':>20}  "
                     f"{'':12} {refused_text(report.refused_without_key)}")
    return lines


def _fmt_num(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def refused_text(counts: dict[str, int]) -> str:
    """"3 (auth 2, quota 1)", or "0"."""
    if not counts:
        return "0"
    return f"{sum(counts.values())} ({', '.join(f'{r} {n}' for r, n in sorted(counts.items()))})"
