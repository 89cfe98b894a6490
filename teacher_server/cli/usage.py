"""`teacher-server usage`: the ledger's usage report (ledger/usage_report.py) as a table or as JSON, with the prices
billed, what each purpose cost (the client's `probe` requests beside the training targets) and the calls refused.
The JSON entries are the dashboard's /api/usage/keys `keys`, field for field; the CSV is usage_report.write_usage_csv
(the same bytes as the dashboard's /api/usage/daily.csv)."""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from maskedkd.purpose import PROBE
from teacher_server.cli.common import CliError, add_db, open_sessions

if TYPE_CHECKING:  # the ledger's modules load SQLAlchemy: only `usage` itself needs them
    from teacher_server.ledger.reports import BilledPrice, PurposeUsage
    from teacher_server.ledger.usage_report import KeyUsage, UsageByKey


def report_json(report: UsageByKey) -> list[dict[str, Any]]:
    """One entry per key (a KeyUsage, as the dashboard serializes it), and an entry with key null for calls refused
    before a key was known."""
    from pydantic import TypeAdapter

    from teacher_server.ledger.usage_report import KeyUsage

    entries: list[dict[str, Any]] = TypeAdapter(list[KeyUsage]).dump_python(report.keys, mode="json")
    if report.refused_without_key:
        entries.append({"key": None, "refused": report.refused_without_key})
    return entries


def fmt_num(value: float | None) -> str:
    """A limit or price for a table: 6 significant digits, "-" for none."""
    return "-" if value is None else f"{value:.6g}"


def _costs(parts: Iterable[BilledPrice | PurposeUsage]) -> str:
    """Costs as billed, one currency at a time: "0.00001234 USD + 0.00000100 EUR" (or 0)."""
    per: dict[str, float] = defaultdict(float)
    for p in parts:
        per[p.currency] += p.cost
    return " + ".join(f"{c:.8f} {cur}" for cur, c in sorted(per.items())) or f"{0.0:.8f}"


def _probes(k: KeyUsage) -> tuple[str, str]:
    """(probe GFLOPs with their share of the key's GFLOPs, probe cost as billed)."""
    share = 100.0 * k.probe_gflops / k.gflops if k.gflops > 0 else 0.0
    return f"{k.probe_gflops:.6f} ({share:.1f}%)", _costs(p for p in k.by_purpose if p.purpose == PROBE)


def report_lines(report: UsageByKey) -> list[str]:
    """The table: one line per key (and one for calls refused before a key was known)."""
    lines = [
        (
            f"{'KEY':24} {'REQUESTS':>9} {'IMAGES':>9} {'GFLOPS':>14} {'FULL_GFLOPS':>14} {'SAVING':>8} "
            f"{'COST (AS BILLED)':>20} {'PROBE_GFLOPS (SHARE)':>22} {'PROBE_COST':>20}  {'PRICE/GFLOP':12} REFUSED"
        )
    ]
    for k in report.keys:
        prices = ", ".join(sorted({f"{fmt_num(b.price_per_gflop)} {b.currency}" for b in k.billed})) or "-"
        probe_gflops, probe_cost = _probes(k)
        lines.append(
            f"{k.key:24} {k.requests:>9} {k.images:>9} {k.gflops:>14.6f} {k.full_gflops:>14.6f} "
            f"{k.saving_pct:>7.2f}% {_costs(k.billed):>20} {probe_gflops:>22} {probe_cost:>20}  "
            f"{prices:12} {refused_text(k.refused)}"
        )
    if report.refused_without_key:
        lines.append(
            f"{'(no key known)':24} {'':>9} {'':>9} {'':>14} {'':>14} {'':>8} {'':>20} {'':>22} {'':>20}  "
            f"{'':12} {refused_text(report.refused_without_key)}"
        )
    return lines


def refused_text(counts: dict[str, int]) -> str:
    """ "3 (auth 2, quota 1)", or "0"."""
    if not counts:
        return "0"
    return f"{sum(counts.values())} ({', '.join(f'{r} {n}' for r, n in sorted(counts.items()))})"


def add_usage_command(sub: Any) -> None:
    usage = sub.add_parser(
        "usage",
        help="totals per key: GFLOPs used, full GFLOPs, saving %%, cost and price as "
        "billed, what probe requests cost, refused calls",
    )
    usage.add_argument("--key", help="only this key (by name)")
    output = usage.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="machine-readable output")
    output.add_argument(
        "--csv",
        action="store_true",
        help="usage per UTC day, key, currency and price as CSV (the dashboard's /api/usage/daily.csv)",
    )
    add_db(usage)


def run_usage(args: argparse.Namespace) -> int:
    from teacher_server.ledger import models, report_series, reports, usage_report

    sessions = open_sessions(args.db, must_exist=True)
    with sessions() as session:
        try:
            if args.csv:
                reports.check_key_exists(session, key_name=args.key)
                usage_report.write_usage_csv(report_series.usage_by_day(session, key_name=args.key), sys.stdout)
                return 0
            report = usage_report.usage_by_key(session, key_name=args.key)
        except models.LedgerError as exc:
            raise CliError(str(exc)) from exc
    if args.json:
        print(json.dumps(report_json(report), indent=2))
    else:
        print("\n".join(report_lines(report)))
    return 0
