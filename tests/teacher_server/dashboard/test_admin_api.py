"""The dashboard's admin API against a real SQLite ledger: its calls need the admin token and are off without one;
creating, updating and disabling keys write the ledger (read back with SQL), a patch is all or nothing, bad input is
a clear 4xx that changes nothing; through a real teacher server, billing equals the answers and admin changes take
effect; `teacher-server dashboard` serves the ledger and refuses a missing one in one line."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import torch
from api_testkit import ADMIN, VIEWER, assert_key_numbers, rows, sql_totals_by_key
from dashboard_process import dashboard_process, first_answer
from fastapi.testclient import TestClient
from seed_ledger import ADMIN_TOKEN, DEFAULT_PRICE, VIEWER_TOKEN, SeededLedger

from maskedkd.codec import tensor_to_proto
from maskedkd.v1 import teacher_pb2 as pb
from maskedkd.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.dashboard import create_app
from teacher_server.settings import ServerSettings
from teacher_server.testing.server import running_server

pytestmark = pytest.mark.dtype("none")  # no model numerics


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
