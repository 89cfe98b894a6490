"""The dashboard's usage API against a real SQLite ledger: every number equals an independent sum over the ledger's
rows (raw SQL through the sqlite3 module, bucketing in Python), and the API documents itself. Its admin calls:
test_admin_api.py."""

from __future__ import annotations

import csv
import io
import itertools
import math
from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pytest
from api_testkit import REL, assert_key_numbers, epoch_of, rows, sql_totals_by_key, stored
from fastapi.testclient import TestClient
from seed_ledger import PLANS, SeededLedger

pytestmark = pytest.mark.dtype("none")  # no model numerics


def test_usage_by_key_equals_sql_sums(client: TestClient, seeded: SeededLedger) -> None:
    body = client.get("/api/usage/keys").json()
    expected = sql_totals_by_key(seeded.path)
    assert [k["key"] for k in body["keys"]] == sorted(expected)  # every key, also those without usage
    assert len(expected) == len(PLANS)
    for key in body["keys"]:
        assert_key_numbers(key, expected[key["key"]])
    columns = list(zip(*expected.values(), strict=True))
    assert_key_numbers(body["total"], tuple(sum(c) for c in columns))
    assert body["currency"] == "USD" and "default_price_per_gflop" not in body
    assert body["cost_by_currency"] == [
        {"currency": "USD", "requests": sum(columns[0]), "cost": pytest.approx(sum(columns[5]), rel=REL)}
    ]

    # the prices billed, from the usage rows; key settings (quota use, status) straight from api_keys
    billed = defaultdict(list)
    for name, price, currency, n, cost in rows(
        seeded.path,
        "SELECT k.name, u.price_per_gflop, u.currency, "
        "COUNT(*), SUM(u.cost) FROM usage u JOIN api_keys k ON "
        "k.id = u.api_key_id GROUP BY 1, 2, 3",
    ):
        billed[name].append((price, currency, n, pytest.approx(cost, rel=REL)))
    settings = {
        r[0]: r[1:]
        for r in rows(seeded.path, "SELECT name, price_per_gflop, quota_gflops, disabled, key_prefix FROM api_keys")
    }
    for key in body["keys"]:
        price, quota, disabled, prefix = settings[key["key"]]
        assert [(b["price_per_gflop"], b["currency"], b["requests"], b["cost"]) for b in key["billed"]] == billed[
            key["key"]
        ]
        assert key["price_per_gflop"] == price and key["currency"] == ("USD" if billed[key["key"]] else None)
        assert key["disabled"] == bool(disabled) and key["key_prefix"] == prefix
        used = expected[key["key"]][3]
        assert key["quota_used_pct"] == (None if quota is None else pytest.approx(100 * used / quota, rel=REL))
    assert any(k["disabled"] for k in body["keys"]) and any(k["requests"] == 0 for k in body["keys"])


def test_probe_costs_per_key_and_per_day_equal_sql_sums(client: TestClient, seeded: SeededLedger) -> None:
    body = client.get("/api/usage/keys").json()
    per_purpose = defaultdict(list)
    for name, purpose, currency, n, gflops, cost in rows(
        seeded.path,
        """
            SELECT k.name, u.purpose, u.currency, COUNT(*), SUM(u.gflops), SUM(u.cost) FROM usage u
            JOIN api_keys k ON k.id = u.api_key_id GROUP BY 1, 2, 3 ORDER BY 1, 2, 3""",
    ):
        per_purpose[name].append((purpose, currency, n, pytest.approx(gflops, rel=REL), pytest.approx(cost, rel=REL)))
    probes = {
        r[0]: r[1:]
        for r in rows(
            seeded.path,
            """
        SELECT k.name, COUNT(u.id), COALESCE(SUM(u.gflops), 0.0), COALESCE(SUM(u.cost), 0.0) FROM api_keys k
        LEFT JOIN usage u ON u.api_key_id = k.id AND u.purpose = 'probe' GROUP BY k.name""",
        )
    }
    assert sum(1 for n, _, _ in probes.values() if n) == 2  # the seed has probes on two keys, not on the others
    for key in body["keys"]:
        assert [
            (p["purpose"], p["currency"], p["requests"], p["gflops"], p["cost"]) for p in key["by_purpose"]
        ] == per_purpose[key["key"]]
        n, gflops, cost = probes[key["key"]]
        assert key["probe_requests"] == n
        assert key["probe_gflops"] == pytest.approx(gflops, rel=REL, abs=0.0)
        assert key["probe_cost"] == pytest.approx(cost, rel=REL, abs=0.0)
        assert key["probe_gflops"] < key["gflops"] or key["gflops"] == 0
    assert body["total"]["probe_requests"] == sum(n for n, _, _ in probes.values())
    assert body["total"]["probe_gflops"] == pytest.approx(sum(g for _, g, _ in probes.values()), rel=REL)

    daily = client.get("/api/usage/daily").json()["days"]
    expected = {
        (day, name, price): (n, pytest.approx(g, rel=REL, abs=0.0), pytest.approx(c, rel=REL, abs=0.0))
        for day, name, price, n, g, c in rows(
            seeded.path,
            """
                    SELECT date(u.created_at), k.name, u.price_per_gflop,
                           SUM(u.purpose = 'probe'), SUM(CASE WHEN u.purpose = 'probe' THEN u.gflops ELSE 0 END),
                           SUM(CASE WHEN u.purpose = 'probe' THEN u.cost ELSE 0 END)
                    FROM usage u JOIN api_keys k ON k.id = u.api_key_id GROUP BY 1, 2, 3""",
        )
    }
    assert {
        (d["day"], d["key"], d["price_per_gflop"]): (d["probe_requests"], d["probe_gflops"], d["probe_cost"])
        for d in daily
    } == expected
    exported = list(csv.DictReader(io.StringIO(client.get("/api/usage/daily.csv").text)))
    assert [
        (r["day"], r["key"], int(r["probe_requests"]), float(r["probe_gflops"]), float(r["probe_cost"]))
        for r in exported
    ] == [(d["day"], d["key"], d["probe_requests"], d["probe_gflops"], d["probe_cost"]) for d in daily]


def test_usage_window_equals_sql(client: TestClient, seeded: SeededLedger) -> None:
    since, until = seeded.now - timedelta(minutes=100), seeded.now - timedelta(minutes=30)
    body = client.get("/api/usage/keys", params={"since": since.isoformat(), "until": until.isoformat()}).json()
    expected = sql_totals_by_key(
        seeded.path, "AND u.created_at >= ? AND u.created_at < ?", (stored(since), stored(until))
    )
    everything = sql_totals_by_key(seeded.path)
    assert any(expected[k][0] != everything[k][0] for k in expected)  # the window really cuts
    for key in body["keys"]:
        assert_key_numbers(key, expected[key["key"]])
    one = client.get("/api/usage/keys", params={"key": "robotics-lab"}).json()
    assert [k["key"] for k in one["keys"]] == ["robotics-lab"]
    assert_key_numbers(one["total"], everything["robotics-lab"])


@pytest.mark.parametrize("bucket,width", [("minute", 60), ("hour", 3600), ("day", 86400)])
def test_timeseries_equals_python_bucketing_of_rows(
    client: TestClient, seeded: SeededLedger, bucket: str, width: int
) -> None:
    body = client.get("/api/usage/timeseries", params={"bucket": bucket}).json()
    cells: dict[tuple[str, int], list[float]] = defaultdict(lambda: [0, 0, 0.0, 0.0, 0.0])
    for name, created, images, gflops, full, cost in rows(
        seeded.path,
        "SELECT k.name, u.created_at, u.images, u.gflops, u.full_gflops, u.cost "
        "FROM usage u JOIN api_keys k ON k.id = u.api_key_id",
    ):
        cell = cells[(name, int(epoch_of(created)) // width * width)]
        for i, value in enumerate((1, images, gflops, full, cost)):
            cell[i] += value
    stamps = body["timestamps"]
    assert body["bucket"] == bucket and body["bucket_seconds"] == width
    assert stamps[0] == min(b for _, b in cells)
    assert stamps[-1] == int(datetime.fromisoformat(body["until"]).timestamp()) // width * width
    assert all(b - a == width for a, b in itertools.pairwise(stamps))
    assert sorted(s["key"] for s in body["series"]) == sorted({k for k, _ in cells})
    for series in body["series"]:
        for i, t in enumerate(stamps):
            want = cells.get((series["key"], t), [0, 0, 0.0, 0.0, 0.0])
            got = [series[f][i] for f in ("requests", "images", "gflops", "full_gflops", "cost")]
            assert got[:2] == want[:2], (series["key"], t)
            assert got[2:] == pytest.approx(want[2:], rel=REL)


def test_latency_figures_equal_numpy_over_recent_rows(client: TestClient, seeded: SeededLedger) -> None:
    body = client.get("/api/usage/latency", params={"limit": 200}).json()
    recent = rows(
        seeded.path,
        "SELECT k.name, u.latency_ms, u.queue_ms, u.images, u.batch_images FROM usage u "
        "JOIN api_keys k ON k.id = u.api_key_id ORDER BY u.id DESC LIMIT 200",
    )
    groups: dict[str, list[tuple[Any, ...]]] = {"*": recent}
    for r in recent:
        groups.setdefault(r[0], []).append(r)
    figures = {f["key"]: f for f in [*body["keys"], body["overall"]]}
    assert set(figures) == set(groups)
    for key, group in groups.items():
        latency, queue, images, batch = (np.array([r[i] for r in group], dtype=float) for i in (1, 2, 3, 4))
        f = figures[key]
        assert f["requests"] == len(group)
        assert f["latency_ms_p50"] == pytest.approx(np.percentile(latency, 50), rel=REL)
        assert f["latency_ms_p95"] == pytest.approx(np.percentile(latency, 95), rel=REL)
        assert f["latency_ms_max"] == pytest.approx(latency.max(), rel=REL)
        assert f["queue_ms_p95"] == pytest.approx(np.percentile(queue, 95), rel=REL)
        assert f["images_per_request_mean"] == pytest.approx(images.mean(), rel=REL)
        assert f["batch_images_mean"] == pytest.approx(batch.mean(), rel=REL)
        assert f["batch_images_max"] == batch.max()


def test_openapi_documents_the_api(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for path, method, model in [
        ("/api/usage/keys", "get", "UsageByKey"),
        ("/api/usage/timeseries", "get", "UsageSeries"),
        ("/api/usage/latency", "get", "RecentLatency"),
        ("/api/keys", "post", "CreatedKey"),
        ("/api/keys/{name}", "patch", "ApiKeyView"),
        ("/healthz", "get", "Health"),
    ]:
        ok = next(c for c in ("200", "201") if c in paths[path][method]["responses"])
        assert paths[path][method]["responses"][ok]["content"]["application/json"]["schema"]["$ref"].endswith(model)
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    assert client.get("/docs").status_code == 200 and client.get("/healthz").json()["status"] == "ok"


def test_percentile_matches_numpy() -> None:
    from teacher_server.dashboard.api.usage import percentile

    values = [float(v) for v in np.random.default_rng(0).exponential(10, size=37)]
    for q in (0, 5, 50, 95, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q), rel=1e-12)
    assert math.isnan(percentile([], 50))
