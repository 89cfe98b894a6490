"""The reproduction's results table: a per-image-K (SIPS mass) row is labelled with its mass and mean kept share and
shows its billed GFLOPs and ratio to full KD like every other row."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from experiments.configs import SMOKE
from experiments.repro_report import aggregate, results_markdown

pytestmark = pytest.mark.dtype("none")  # no model numerics


def result(method: str, seed: int, gflops: float, kept: float | None) -> dict[str, Any]:
    return {
        "method": method,
        "seed": seed,
        "top1": 50.0 + seed,
        "top5": 90.0,
        "images": 40,
        "ledger": {"gflops": gflops, "full_gflops": 100.0},
        "client_gflops": gflops,
        "train_wall_s": 60.0,
        "probe_gflops": 0.0,
        "keep_decisions": [],
        "kept_fraction": kept,
    }


def test_a_mass_row_shows_its_mass_mean_kept_share_and_gflops(tmp_path: Path) -> None:
    results = [
        result("full_kd", 0, 100.0, 1.0),
        result("full_kd", 1, 100.0, 1.0),
        result("mass_90", 0, 60.0, 0.6),
        result("mass_90", 1, 70.0, 0.7),
    ]
    rows = aggregate(results, ("full_kd", "mass_90"))
    md = results_markdown(
        SMOKE,
        "python -m experiments.reproduce --smoke",
        rows,
        None,
        data="d",
        figure=None,
        doc=tmp_path / "r.md",
        failures=[],
        pending=0,
        total_runs=4,
    )
    line = next(ln for ln in md.splitlines() if ln.startswith("| MaskedKD per-image K (90% of SIPS mass)"))
    cells = [c.strip() for c in line.split("|")[1:-1]]
    assert cells[1:4] == ["kd", "90% of SIPS mass per image, mean kept 65.0%", "sips"]
    assert cells[7:10] == ["65.0", "65.0", "0.650"] and cells[11] == "35.0%"


def test_a_mass_run_done_before_kept_fractions_were_recorded_still_gets_a_row(tmp_path: Path) -> None:
    old = result("mass_90", 0, 60.0, None)
    del old["kept_fraction"]
    rows = aggregate([old], ("mass_90",))
    md = results_markdown(
        SMOKE, "cmd", rows, None, data="d", figure=None, doc=tmp_path / "r.md", failures=[], pending=0, total_runs=1
    )
    assert "| 90% of SIPS mass per image | sips |" in md


def test_the_machines_each_run_ran_on_are_counted(tmp_path: Path) -> None:
    xeon = {"cpu": "Xeon", "cpus": 2, "precision": "fp32", "torch": "2.x"}
    epyc = {"cpu": "EPYC", "cpus": 2, "precision": "bf16", "torch": "2.x"}
    runs = [result("full_kd", 0, 100.0, 1.0), result("full_kd", 1, 100.0, 1.0), result("no_kd", 0, 0.0, 1.0)]
    runs[0]["machine"], runs[1]["machine"] = xeon, epyc
    rows = aggregate(runs, ("no_kd", "full_kd"))
    md = results_markdown(
        SMOKE, "cmd", rows, None, data="d", figure=None, doc=tmp_path / "r.md", failures=[], pending=0, total_runs=3
    )
    line = next(ln for ln in md.splitlines() if ln.startswith("- Machines: "))
    assert "1 run on a machine not recorded" in line
    assert "1 run on Xeon (2 cores, fp32, torch 2.x)" in line and "1 run on EPYC (2 cores, bf16, torch 2.x)" in line


def test_the_ratio_to_full_kd_is_over_a_complete_full_kd_run(tmp_path: Path) -> None:
    rebilled = result("full_kd", 1, 120.0, 1.0)  # restarted: the ledger billed 20 GFLOPs twice
    rebilled["client_gflops"] = 100.0
    rows = aggregate(
        [result("full_kd", 0, 100.0, 1.0), rebilled, result("maskedkd_50", 0, 50.0, 0.5)], ("full_kd", "maskedkd_50")
    )
    by_key = {r["method"]: r for r in rows}
    assert by_key["full_kd"]["teacher_gflops"] == 110.0 and by_key["full_kd"]["resumed_seeds"] == [1]
    assert by_key["maskedkd_50"]["x_full_kd"] == 0.5
