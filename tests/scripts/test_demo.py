"""A short `make demo` run end to end (real server subprocess, real key, 2 Ray workers), checking its printed numbers."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_short_demo_prints_accuracy_and_a_bill_matching_keep(tmp_path: Path) -> None:
    keep = 0.5
    cmd = [sys.executable, str(REPO / "scripts" / "demo.py"), "--exit", "--workdir", str(tmp_path / "demo"),
           "--epochs", "1", "--max-steps", "30", "--keep", str(keep), "--dashboard-port", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    out = proc.stdout
    assert proc.returncode == 0, f"demo failed:\n{out[-3000:]}\n{proc.stderr[-3000:]}"

    def number(label: str) -> float:
        match = re.search(label + r"\s+top-1\s+([0-9.]+)%", out)
        assert match, f"no {label!r} line in:\n{out[-2000:]}"
        return float(match.group(1))

    chance = 100.0 / 10
    assert number(r"student, MaskedKD keep 50%") > chance + 5
    assert number(r"student, no KD") > chance + 5
    assert number(r"teacher \(6-block ViT, frozen\)") > 30.0
    used = re.search(r"teacher GFLOPs used\s+([0-9.]+) of ([0-9.]+) for the full teacher", out)
    assert used, out[-2000:]
    gflops, full = float(used.group(1)), float(used.group(2))
    assert full > 0
    # The FLOP model of this teacher at K=32 of 64 patches: attention is quadratic, so a bit under keep x full.
    assert 0.40 * full < gflops < (keep + 0.02) * full
    assert re.search(r"dashboard\s+http://127\.0\.0\.1:\d+/", out)
    # The ledger the demo wrote agrees with what it printed (read back through the CLI, not the demo).
    usage = subprocess.run([str(Path(sys.executable).parent / "teacher-server"), "usage", "--json", "--db",
                            f"sqlite:///{tmp_path / 'demo' / 'ledger.db'}"], capture_output=True, text=True)
    assert usage.returncode == 0, usage.stderr
    (row,) = json.loads(usage.stdout)
    assert row["key"] == "demo-student"
    assert abs(row["gflops"] - gflops) <= 0.051 and abs(row["full_gflops"] - full) <= 0.051  # printed with .1f
