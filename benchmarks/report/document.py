"""docs/benchmarks.md from the results of one run (the JSON beside it holds every number): the run's header, the
machine, the targets, then the sections (sections.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.report.sections import RENDER
from benchmarks.report.tables import table

MAKE_TARGETS = {
    "python -m benchmarks --out docs": " (`make bench`)",
    "python -m benchmarks --quick --out out/bench-quick": " (`make bench-quick`)",
}


def _machine(r: dict[str, Any]) -> str:
    m = r["machine"]
    mm = r["sections"].get("matmul", {})
    rows = [
        ("CPU", m["cpu_model"]),
        ("cores (logical / usable)", f"{m['logical_cpus']} / {m['usable_cpus']}"),
        ("torch threads", m["torch_threads"]),
        ("torch / timm / grpcio", f"{m['torch']} / {m['timm']} / {m['grpcio']}"),
        ("python", m["python"]),
        ("platform", m["platform"]),
        ("git", m["git"]),
        ("load average at start / end", f"{m['load_average_at_start']} / {m.get('load_average_at_end')}"),
    ]
    if m.get("gpu"):
        rows.append(("GPU", m["gpu"]))
    if mm.get("status") == "ok":
        start, end = mm["start"], mm.get("end")
        rows.append(
            (
                f"fp32 matmul {start['n']}x{start['n']} (start / end)",
                f"{start['gflops_per_s']:.1f} / {end['gflops_per_s']:.1f} GFLOP/s (drift {mm['drift']:.2f})"
                if end
                else f"{start['gflops_per_s']:.1f} GFLOP/s",
            )
        )
    return table(("", ""), rows)


def _targets(r: dict[str, Any]) -> str:
    ts = r.get("targets", [])
    if not ts:
        return "No target could be evaluated (see the sections' errors)."
    passed = sum(t["result"] == "PASS" for t in ts)
    na = sum(t["result"] == "N/A" for t in ts)
    rows = [
        (f"**{t['result']}**", t["name"], t["scope"], f"{t['value']:.3f}", f"{t['op']} {t['threshold']}", t["detail"])
        for t in ts
    ]
    return f"{passed} of {len(ts) - na} pass ({na} not applicable on this machine).\n\n" + table(
        ("result", "target", "scope", "measured", "needs", "numbers"), rows
    )


def render(results: dict[str, Any], plots: Sequence[str] = ()) -> str:
    quick = results["mode"] == "quick"
    head = [
        "# Benchmarks",
        "",
        f"Made by `{results['command']}`"
        + MAKE_TARGETS.get(results["command"], "")
        + f" on {results['started_utc']}, in {results['total_s']} s. Every number below comes from this one run on "
        "this one machine; targets are ratios within the run. Full data: `benchmarks.json` beside this file. "
        "Why the misses miss, with measurements: [performance-notes.md](performance-notes.md).",
        "",
    ]
    if quick:
        head += [
            "> **Quick mode**: tiny stand-in models and one repeat, to check that the suite works. The numbers "
            "are not measurements.",
            "",
        ]
    load = results["machine"].get("load_average_at_start")
    cpus = results["machine"].get("usable_cpus") or 1
    if load and load[0] > 0.5 * cpus:
        head += [
            f"> **Warning**: the 1-minute load average was {load[0]} on {cpus} CPUs when the run started: other "
            "work was running, so the timings are not trustworthy.",
            "",
        ]
    drift = results["sections"].get("matmul", {}).get("drift")
    if drift is not None and not 0.9 <= drift <= 1.1:
        head += [
            f"> **Warning**: the matmul rate changed by {100 * (drift - 1):+.0f}% between the start and the end "
            "of the run: the machine was not quiet, so the ratios are unreliable.",
            "",
        ]
    out = [*head, "## Machine", "", _machine(results), "", "## Targets", "", _targets(results), ""]
    for i, (key, title, fn) in enumerate(RENDER, start=1):
        sec = results["sections"].get(key)
        out += [f"## {i}. {title}", ""]
        if sec is None:
            out.append("not run (section not selected)")
        elif sec.get("status") == "ok":
            out.append(fn(sec))
        else:
            out.append(sec.get("error") or sec.get("status", "not run"))
        out.append("")
    if plots:
        out += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    return "\n".join(out)


def write_report(results: dict[str, Any], path: Path, plots: Sequence[str] = ()) -> None:
    path.write_text(render(results, plots))
