"""The dashboard's JSON API against a real SQLite ledger: every number equals an independent sum over the ledger's rows
(raw SQL through the sqlite3 module, bucketing in Python), admin calls need the admin token, bad input is a 4xx."""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import math
import os
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import torch
from dashboard_process import dashboard_process, first_answer
from fastapi.testclient import TestClient
from seed_ledger import ADMIN_TOKEN, DEFAULT_PRICE, PLANS, VIEWER_TOKEN, SeededLedger

from maskedkd.codec import tensor_to_proto
from maskedkd.v1 import teacher_pb2 as pb
from maskedkd.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.dashboard import create_app
from teacher_server.settings import ServerSettings
from teacher_server.testing.server import running_server

pytestmark = pytest.mark.dtype("none")  # no model numerics

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
VIEWER = {"Authorization": f"Bearer {VIEWER_TOKEN}"}
REL = 1e-9  # float sums in SQL and in Python may differ in the last bits only


def rows(db: Path, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as con:
        return con.execute(query, params).fetchall()


def sql_totals_by_key(db: Path, where: str = "", params: tuple[Any, ...] = ()) -> dict[str, tuple[Any, ...]]:
    """name -> (requests, images, tokens, gflops, full_gflops, cost) over usage rows matching `where`."""
    query = (
        "SELECT k.name, COUNT(u.id), COALESCE(SUM(u.images), 0), COALESCE(SUM(u.tokens), 0), "
        "COALESCE(SUM(u.gflops), 0.0), COALESCE(SUM(u.full_gflops), 0.0), COALESCE(SUM(u.cost), 0.0) "
        f"FROM api_keys k LEFT JOIN usage u ON u.api_key_id = k.id {where} GROUP BY k.name"
    )
    return {r[0]: r[1:] for r in rows(db, query, params)}


def stored(moment: datetime) -> str:
    """How SQLAlchemy stores a UTC datetime in SQLite (text), for comparisons in raw SQL."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def epoch_of(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


@pytest.fixture(scope="module")
def client(seeded: SeededLedger) -> TestClient:
    """Reads with the viewer token (tests/teacher_server/dashboard/test_access.py covers reading without it)."""
    return TestClient(create_app(seeded.settings), raise_server_exceptions=False, headers=VIEWER)


def assert_key_numbers(api_key: dict[str, Any], expected: tuple[Any, ...]) -> None:
    requests, images, tokens, gflops, full, cost = expected
    assert (api_key["requests"], api_key["images"], api_key["tokens"]) == (requests, images, tokens)
    assert api_key["gflops"] == pytest.approx(gflops, rel=REL)
    assert api_key["full_gflops"] == pytest.approx(full, rel=REL)
    assert api_key["saved_gflops"] == pytest.approx(full - gflops, rel=REL, abs=1e-9)
    assert api_key["cost"] == pytest.approx(cost, rel=REL)
    assert api_key["saving_pct"] == pytest.approx(100 * (1 - gflops / full) if full else 0.0, rel=REL, abs=1e-9)


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


@pytest.mark.parametrize(
    "method,path,payload",
    [
        ("GET", "/api/keys", None),
        ("POST", "/api/keys", {"name": "x"}),
        ("PATCH", "/api/keys/vision-team", {}),
        ("POST", "/api/keys/vision-team/disable", None),
        ("POST", "/api/keys/vision-team/enable", None),
    ],
)
def test_admin_endpoints_need_the_admin_token(
    client: TestClient, seeded: SeededLedger, method: str, path: str, payload: dict[str, Any] | None
) -> None:
    before = rows(seeded.path, "SELECT * FROM api_keys ORDER BY id")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {ADMIN_TOKEN}"}):
        response = client.request(method, path, json=payload, headers=headers)
        assert response.status_code == 401, (headers, response.text)
    assert rows(seeded.path, "SELECT * FROM api_keys ORDER BY id") == before


def test_admin_api_off_without_a_configured_token(seeded: SeededLedger) -> None:
    app = create_app(seeded.settings.model_copy(update={"admin_token": None}))
    response = TestClient(app).post("/api/keys", json={"name": "x"}, headers=ADMIN)
    assert response.status_code == 403
    assert "MASKEDKD_ADMIN_TOKEN" in response.json()["detail"] and "--admin-token" in response.json()["detail"]
    assert TestClient(app).get("/api/usage/keys", headers=VIEWER).status_code == 200  # the viewer still reads


def test_admin_create_update_disable_write_the_ledger(seeded: SeededLedger, tmp_path: Path) -> None:
    db = tmp_path / "admin.db"
    client = TestClient(
        create_app(seeded.settings.model_copy(update={"db": f"sqlite:///{db}"})), raise_server_exceptions=False
    )
    created = client.post("/api/keys", json={"name": "admin-made", "quota_gflops": 50.0}, headers=ADMIN)
    assert created.status_code == 201, created.text
    secret = created.json()["secret"]
    ((key_hash, prefix, quota, price, disabled),) = rows(
        db,
        "SELECT key_hash, key_prefix, quota_gflops, price_per_gflop, disabled FROM api_keys WHERE name = 'admin-made'",
    )
    assert key_hash == hashlib.sha256(secret.encode()).hexdigest() and secret.startswith(prefix)
    assert (quota, price, disabled) == (50.0, None, 0)
    with sqlite3.connect(db) as con:  # only the hash is stored: the secret is nowhere in the database
        assert secret not in "\n".join(con.iterdump())
    listed = client.get("/api/keys", headers=ADMIN).json()
    assert "admin-made" in [k["name"] for k in listed] and secret not in str(listed)
    assert client.post("/api/keys", json={"name": "admin-made"}, headers=ADMIN).status_code == 409

    assert client.patch("/api/keys/admin-made", json={"price_per_gflop": 4e-6}, headers=ADMIN).status_code == 200
    assert rows(db, "SELECT quota_gflops, price_per_gflop FROM api_keys WHERE name = 'admin-made'") == [
        (50.0, 4e-6)
    ]  # fields not sent stay as they were
    client.patch("/api/keys/admin-made", json={"quota_gflops": None}, headers=ADMIN)
    assert rows(db, "SELECT quota_gflops FROM api_keys WHERE name = 'admin-made'") == [(None,)]

    assert client.post("/api/keys/admin-made/disable", headers=ADMIN).json()["disabled"] is True
    assert rows(db, "SELECT disabled FROM api_keys WHERE name = 'admin-made'") == [(1,)]
    assert client.patch("/api/keys/admin-made", json={"disabled": False}, headers=ADMIN).json()["disabled"] is False
    assert rows(db, "SELECT disabled FROM api_keys WHERE name = 'admin-made'") == [(0,)]


def test_admin_sets_quota_window_and_rate_limit(seeded: SeededLedger, tmp_path: Path) -> None:
    db = tmp_path / "limits.db"
    client = TestClient(
        create_app(seeded.settings.model_copy(update={"db": f"sqlite:///{db}"})), raise_server_exceptions=False
    )
    created = client.post(
        "/api/keys",
        json={"name": "team", "quota_gflops": 10.0, "quota_window": "month", "rate_limit_gflops_per_min": 2.5},
        headers=ADMIN,
    )
    assert created.status_code == 201, created.text
    assert (created.json()["quota_window"], created.json()["rate_limit_gflops_per_min"]) == ("month", 2.5)
    assert rows(db, "SELECT quota_gflops, quota_window, rate_limit_gflops_per_min FROM api_keys") == [
        (10.0, "month", 2.5)
    ]
    changed = client.patch(
        "/api/keys/team", json={"quota_window": "day", "rate_limit_gflops_per_min": None}, headers=ADMIN
    )
    assert changed.status_code == 200 and changed.json()["quota_window"] == "day"
    assert rows(db, "SELECT quota_gflops, quota_window, rate_limit_gflops_per_min FROM api_keys") == [
        (10.0, "day", None)
    ]
    for body in ({"quota_window": "week"}, {"rate_limit_gflops_per_min": 0}, {"quota_window": None}):
        assert client.patch("/api/keys/team", json=body, headers=ADMIN).status_code in (400, 422), body
    assert rows(db, "SELECT quota_window FROM api_keys") == [("day",)]


def test_admin_sets_a_keys_fair_share_weight_and_priority(seeded: SeededLedger, tmp_path: Path) -> None:
    db = tmp_path / "share.db"
    client = TestClient(
        create_app(seeded.settings.model_copy(update={"db": f"sqlite:///{db}"})), raise_server_exceptions=False
    )
    created = client.post("/api/keys", json={"name": "ops", "weight": 2.5, "priority": "interactive"}, headers=ADMIN)
    assert created.status_code == 201, created.text
    assert (created.json()["weight"], created.json()["priority"]) == (2.5, "interactive")
    changed = client.patch("/api/keys/ops", json={"priority": "batch"}, headers=ADMIN)
    assert changed.status_code == 200 and (changed.json()["weight"], changed.json()["priority"]) == (2.5, "batch")
    assert rows(db, "SELECT weight, priority FROM api_keys") == [(2.5, "batch")]
    for body in ({"weight": 0}, {"weight": None}, {"priority": "urgent"}):
        assert client.patch("/api/keys/ops", json=body, headers=ADMIN).status_code in (400, 422), body
    assert rows(db, "SELECT weight, priority FROM api_keys") == [(2.5, "batch")]


def test_a_patch_is_all_or_nothing(seeded: SeededLedger, tmp_path: Path) -> None:
    db = tmp_path / "atomic.db"
    client = TestClient(
        create_app(seeded.settings.model_copy(update={"db": f"sqlite:///{db}"})), raise_server_exceptions=False
    )
    assert (
        client.post(
            "/api/keys",
            json={"name": "team", "quota_gflops": 10.0, "quota_window": "month", "price_per_gflop": 1e-6},
            headers=ADMIN,
        ).status_code
        == 201
    )
    key_row = "SELECT disabled, quota_gflops, quota_window, rate_limit_gflops_per_min, price_per_gflop FROM api_keys"
    counters = "SELECT window_start, window_gflops FROM key_counters"
    before = rows(db, key_row), rows(db, counters)
    # each body is valid up to its last field: the fields before it, the window change included, must not stick
    for body in (
        {"disabled": True, "quota_gflops": 99.0, "quota_window": "day", "rate_limit_gflops_per_min": 0},
        {"price_per_gflop": 5e-6, "disabled": True, "quota_window": None},
        {"quota_window": "day", "disabled": None},
        {"quota_gflops": 1.0, "price_per_gflop": -1e-6},
    ):
        response = client.patch("/api/keys/team", json=body, headers=ADMIN)
        assert response.status_code == 400 and response.json()["detail"], (body, response.text)
        assert (rows(db, key_row), rows(db, counters)) == before, body
    assert before[0] == [(0, 10.0, "month", None, 1e-6)]

    changed = client.patch(
        "/api/keys/team",
        json={
            "disabled": True,
            "quota_gflops": 99.0,
            "quota_window": "day",
            "rate_limit_gflops_per_min": 3.0,
            "price_per_gflop": None,
        },
        headers=ADMIN,
    )
    assert changed.status_code == 200, changed.text
    assert rows(db, key_row) == [(1, 99.0, "day", 3.0, None)]
    today = int(time.time()) // 86400 * 86400
    assert rows(db, counters) == [(today, 0.0)]  # the new window starts today, with nothing billed in it yet


@pytest.mark.parametrize(
    "method,path,kwargs,status",
    [
        ("GET", "/api/usage/keys", {"params": {"since": "yesterday"}}, 422),
        ("GET", "/api/usage/keys", {"params": {"since": "2026-01-02T00:00:00", "until": "2026-01-01T00:00:00"}}, 400),
        ("GET", "/api/usage/keys", {"params": {"key": "nobody"}}, 404),
        ("GET", "/api/usage/timeseries", {"params": {"bucket": "fortnight"}}, 422),
        ("GET", "/api/usage/timeseries", {"params": {"since": "2000-01-01", "until": "2999-01-01"}}, 400),  # buckets
        (
            "GET",
            "/api/usage/timeseries",
            {"params": {"since": "2026-01-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"}},
            400,
        ),
        ("GET", "/api/usage/latency", {"params": {"limit": 0}}, 422),
        ("GET", "/api/usage/latency", {"params": {"limit": "many"}}, 422),
        ("GET", "/api/usage/latency", {"params": {"limit": 10**12}}, 422),
        ("POST", "/api/keys", {"json": {}}, 422),
        ("POST", "/api/keys", {"json": {"name": "has space"}}, 422),
        ("POST", "/api/keys", {"json": {"name": "x" * 201}}, 400),
        ("POST", "/api/keys", {"json": {"name": "ok", "quota_gflops": -1}}, 400),
        ("POST", "/api/keys", {"json": {"name": "ok", "rate_limit_gflops_per_min": 0}}, 400),
        ("POST", "/api/keys", {"json": {"name": "ok", "quota_window": "week"}}, 422),
        ("POST", "/api/keys", {"json": {"name": "ok", "price_per_gflop": "cheap"}}, 422),
        ("POST", "/api/keys", {"json": {"name": "ok", "secret": "mkd_chosen"}}, 422),
        ("POST", "/api/keys", {"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 422),
        (
            "POST",
            "/api/keys",
            {"content": b'{"name": "ok", "quota_gflops": NaN}', "headers": {"Content-Type": "application/json"}},
            400,
        ),
        ("PATCH", "/api/keys/nobody", {"json": {"disabled": True}}, 404),
        ("PATCH", "/api/keys/vision-team", {"json": {"disabled": None}}, 400),
        ("PATCH", "/api/keys/vision-team", {"json": {"quota_gflops": -5}}, 400),
        ("PATCH", "/api/keys/vision-team", {"json": {"price_per_gflop": "cheap"}}, 422),
        ("POST", "/api/keys/nobody/disable", {}, 404),
    ],
)
def test_bad_input_is_a_clear_4xx(
    client: TestClient, seeded: SeededLedger, method: str, path: str, kwargs: dict[str, Any], status: int
) -> None:
    before = rows(seeded.path, "SELECT * FROM api_keys ORDER BY id")
    headers = {**ADMIN, **kwargs.pop("headers", {})} if path.startswith("/api/keys") else {}
    response = client.request(method, path, headers=headers, **kwargs)
    assert response.status_code == status, response.text
    assert response.json()["detail"]
    assert rows(seeded.path, "SELECT * FROM api_keys ORDER BY id") == before


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


def _infer(
    stub: pb_grpc.TeacherServiceStub, secret: str, request_id: str, images: int, kept: int, generator: torch.Generator
) -> pb.InferResponse:
    pixels = torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8, generator=generator)
    keep = torch.stack([torch.randperm(64, generator=generator)[:kept].sort().values for _ in range(images)])
    request = pb.InferRequest(request_id=request_id, images=tensor_to_proto(pixels), keep_indices=tensor_to_proto(keep))
    return stub.Infer(request, metadata=[("authorization", f"Bearer {secret}")], timeout=60)


def test_through_the_real_server_billing_equals_responses_and_admin_takes_effect(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    settings = ServerSettings(
        model="vit_tiny_patch16_224",
        model_kwargs={"img_size": 32, "patch_size": 4, "num_classes": 10},
        db=f"sqlite:///{db}",
        admin_token=ADMIN_TOKEN,
        price_per_gflop=DEFAULT_PRICE,
        metrics_port=None,
        auth_cache_s=0.0,
        max_delay_ms=0.0,
        dashboard_port=0,
    )
    generator = torch.Generator().manual_seed(0)
    with running_server(settings) as server:  # `teacher-server serve --dashboard-port`: the server hosts it
        assert server.server.dashboard_port
        client = httpx.Client(
            base_url=f"http://127.0.0.1:{server.server.dashboard_port}", timeout=30, headers=ADMIN
        )  # the admin token also opens the read views
        alice = client.post("/api/keys", json={"name": "alice"}, headers=ADMIN).json()["secret"]
        bob = server.create_key("bob", price_per_gflop=3e-6)
        billed: dict[str, list[pb.Usage]] = {"alice": [], "bob": []}
        states: list[torch.Tensor] = []
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.TeacherServiceStub(channel)
            for i, (who, secret, images, kept) in enumerate(
                [
                    ("alice", alice, 4, 16),
                    ("alice", alice, 2, 64),
                    ("bob", bob, 3, 32),
                    ("alice", alice, 1, 8),
                    ("bob", bob, 5, 48),
                ]
            ):
                states.append(generator.get_state())
                billed[who].append(_infer(stub, secret, f"r{i}", images, kept, generator).usage)
            retry = torch.Generator().set_state(states[2])  # the same inputs as r2
            replay = _infer(stub, bob, "r2", 3, 32, retry)  # a retry: answered from the ledger, not billed
            assert replay.usage.replayed

            body = client.get("/api/usage/keys").json()
            expected = sql_totals_by_key(db)
            for key in body["keys"]:
                usages = billed[key["key"]]
                assert_key_numbers(key, expected[key["key"]])
                assert key["requests"] == len(usages) and key["images"] == sum(u.images for u in usages)
                assert key["gflops"] == pytest.approx(sum(u.gflops for u in usages), rel=1e-6)
                assert key["full_gflops"] == pytest.approx(sum(u.full_gflops for u in usages), rel=1e-6)
                assert key["cost"] == pytest.approx(sum(u.cost for u in usages), rel=1e-6)
            series = client.get("/api/usage/timeseries").json()["series"]
            assert {s["key"]: sum(s["requests"]) for s in series} == {"alice": 3, "bob": 2}
            assert client.get("/api/usage/latency").json()["overall"]["requests"] == 5

            # disabling through the dashboard locks the key out of the server; a zero quota stops bob
            assert client.post("/api/keys/alice/disable", headers=ADMIN).status_code == 200
            with pytest.raises(grpc.RpcError) as refused:
                _infer(stub, alice, "r9", 1, 8, generator)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert client.patch("/api/keys/bob", json={"quota_gflops": 0.0}, headers=ADMIN).status_code == 200
            with pytest.raises(grpc.RpcError) as over:
                _infer(stub, bob, "r10", 1, 8, generator)
            assert over.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert rows(db, "SELECT COUNT(*) FROM usage") == [(5,)]  # refused requests are never billed


def test_dashboard_command_serves_the_ledger(seeded: SeededLedger, tmp_path: Path) -> None:
    """`python -m teacher_server.dashboard` (what `teacher-server dashboard` runs) as a real process."""
    env = {**os.environ, "MASKEDKD_VIEWER_TOKEN": VIEWER_TOKEN}
    env.pop("MASKEDKD_ADMIN_TOKEN", None)
    with dashboard_process("--db", seeded.url, env=env) as (process, port):
        body = first_answer(
            process,
            lambda: httpx.get(f"http://127.0.0.1:{port}/api/usage/keys", headers=VIEWER, timeout=2).json(),
            retry_on=httpx.HTTPError,
        )
        assert body["total"]["requests"] == rows(seeded.path, "SELECT COUNT(*) FROM usage")[0][0]
        assert httpx.get(f"http://127.0.0.1:{port}/api/usage/keys", timeout=2).status_code == 401
        assert httpx.post(f"http://127.0.0.1:{port}/api/keys", json={"name": "x"}).status_code == 403

    bad = subprocess.run(
        [sys.executable, "-m", "teacher_server.dashboard", "--db", "nosuchdialect://x", "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "error: cannot open the ledger" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_percentile_matches_numpy() -> None:
    from teacher_server.dashboard.api.usage import percentile

    values = [float(v) for v in np.random.default_rng(0).exponential(10, size=37)]
    for q in (0, 5, 50, 95, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q), rel=1e-12)
    assert math.isnan(percentile([], 50))
