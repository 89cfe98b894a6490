"""One usage report: `teacher-server usage --json` (a real process) and the dashboard's /api/usage/keys (a real
server) answer the same JSON, field for field, for the same ledger with usage rows, refusals and a disabled key; and
both equal the ledger's rows summed with raw SQL."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from typing import Any

import httpx
import pytest
from dtype_marks import child_env
from seed_ledger import VIEWER_TOKEN, SeededLedger

from teacher_server.dashboard.server import RunningDashboard

pytestmark = pytest.mark.dtype("none")  # no model numerics

# what `usage --json` has always printed per key (README, scripts/demo.py, experiments/services.py read these)
CLI_FIELDS = {
    "key",
    "requests",
    "images",
    "tokens",
    "gflops",
    "full_gflops",
    "saving_pct",
    "cost",
    "billed",
    "by_purpose",
    "refused",
}


def cli_usage(url: str, *args: str) -> list[dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-m", "teacher_server.cli", "usage", "--json", "--db", url, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def api_usage(dashboard: RunningDashboard, **params: str) -> dict[str, Any]:
    response = httpx.get(
        dashboard.url + "/api/usage/keys",
        params=params,
        timeout=30,
        headers={"Authorization": f"Bearer {VIEWER_TOKEN}"},
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_cli_json_and_dashboard_api_agree_field_for_field(seeded: SeededLedger, dashboard: RunningDashboard) -> None:
    printed, served = cli_usage(seeded.url), api_usage(dashboard)

    *per_key, no_key = printed
    assert per_key == served["keys"]
    assert no_key == {"key": None, "refused": served["refused_without_key"]} and no_key["refused"]
    assert all(set(entry) >= CLI_FIELDS for entry in per_key)

    # the same numbers as the ledger's rows, summed independently
    with sqlite3.connect(seeded.path) as con:
        sums = {
            name: (n, cost, disabled)
            for name, n, cost, disabled in con.execute(
                "SELECT k.name, COUNT(u.id), COALESCE(SUM(u.cost), 0.0), k.disabled FROM api_keys k "
                "LEFT JOIN usage u ON u.api_key_id = k.id GROUP BY k.name"
            )
        }
    assert {e["key"]: (e["requests"], pytest.approx(e["cost"], rel=1e-9), e["disabled"]) for e in per_key} == {
        name: (n, cost, bool(disabled)) for name, (n, cost, disabled) in sums.items()
    }
    assert any(e["disabled"] for e in per_key) and any(e["by_purpose"] for e in per_key)
    assert any(e["refused"] for e in per_key)

    one_printed, one_served = cli_usage(seeded.url, "--key", "robotics-lab"), api_usage(dashboard, key="robotics-lab")
    assert one_printed == one_served["keys"] and [e["key"] for e in one_printed] == ["robotics-lab"]
    assert one_served["refused_without_key"] == {}
