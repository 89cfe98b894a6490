"""The ledger on a real PostgreSQL server (throw-away, from Debian's packages; see postgres_testkit): the gRPC server
bills exactly under concurrency, replays exactly once (retry, restart, two servers on one database), refuses over
quota without billing; `teacher-server keys/usage --db postgresql+psycopg2://...` and the dashboard API agree with
raw SQL run through psycopg2 alone. The server's time zone is not UTC, so time handling is checked too."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import service_testkit as kit
from dtype_marks import child_env
from fastapi.testclient import TestClient
from postgres_testkit import pg_rows, postgres_server, postgres_url  # noqa: F401 (fixtures)
from service_testkit import MODEL, TINY, auth, image_request, random_images, random_keep, stub

from maskedkd.v1 import teacher_pb2 as pb
from teacher_server.dashboard import create_app
from teacher_server.ledger import billing, database, keys, models, reports
from teacher_server.ledger.migrate import head_revision
from teacher_server.settings import ServerSettings
from teacher_server.testing.server import running_server

pytestmark = [pytest.mark.dtype("float32"), pytest.mark.timeout(120)]

_SCRIPT = Path(sys.executable).parent / "teacher-server"
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "teacher_server.cli"]
REL = 1e-12  # SQL SUM of doubles may add in another order than Python


model = kit.model_fixture(seed=5)


def pg_settings(url: str, **overrides: Any) -> ServerSettings:
    base: dict[str, Any] = {"model": MODEL, "model_kwargs": TINY, "db": url, "metrics_port": None, "max_delay_ms": 2.0}
    return ServerSettings(**{**base, **overrides})


def usage_rows(url: str) -> list[dict[str, Any]]:
    """Every usage row with its key's name, through psycopg2 (the documented schema, not the ORM)."""
    names = [
        "key",
        "request_id",
        "images",
        "tokens",
        "gflops",
        "full_gflops",
        "cost",
        "batch_images",
        "epoch",
        "logits",
        "logits_shape",
    ]  # the replay payload, from its own table
    query = (
        "SELECT k.name, u.request_id, u.images, u.tokens, u.gflops, u.full_gflops, u.cost, u.batch_images, "
        "EXTRACT(EPOCH FROM u.created_at)::float8, p.logits, p.logits_shape "
        "FROM usage u JOIN api_keys k ON k.id = u.api_key_id LEFT JOIN replay_payloads p ON p.usage_id = u.id "
        "ORDER BY u.id"
    )
    return [dict(zip(names, r, strict=True)) for r in pg_rows(url, query)]


def run_cli(*args: str, db: str) -> subprocess.CompletedProcess[str]:
    env = child_env()
    return subprocess.run([*CLI, *args, "--db", db], capture_output=True, text=True, timeout=60, env=env)


def test_totals_equal_the_sum_of_responses_under_concurrent_clients(postgres_url: str, model) -> None:
    started = time.time()
    with running_server(pg_settings(postgres_url, max_delay_ms=20.0, price_per_gflop=0.003), model=model) as srv:
        keys = {name: srv.create_key(name) for name in ("k0", "k1", "k2")}
        channel, teacher = stub(srv.address)
        responses = kit.concurrent_clients(teacher, keys, unary=(6, 4), streams=(2, 6))
        with srv.server.sessions() as session:
            totals = {t.name: t for t in reports.usage_totals(session)}
        channel.close()
    finished = time.time()

    rows = usage_rows(postgres_url)
    assert len(rows) == len(responses) == 6 * 4 + 2 * 6
    by_id = kit.assert_rows_are_the_responses(rows, responses)
    for _, resp in responses:
        row = by_id[resp.request_id]
        assert started - 1 <= row["epoch"] <= finished + 1  # true UTC instants, whatever the server's zone
        assert (row["logits"] is None) == resp.request_id.startswith("auto-")  # only client ids are replayable
    assert max(r["batch_images"] for r in rows) > 3  # requests of different clients shared micro-batches
    kit.assert_totals_add_up(totals, rows, responses, keys)


def test_retry_replays_across_a_restart_and_between_two_servers(postgres_url: str, model) -> None:
    images, keep = random_images(2, 3), random_keep(2, 12, 3)
    cfg = pg_settings(postgres_url)
    with running_server(cfg, model=model) as srv:
        key = srv.create_key("carol")
        channel, teacher = stub(srv.address)
        first = kit.assert_retry_replays(teacher, images, keep, key)
        channel.close()
    assert [r["request_id"] for r in usage_rows(postgres_url)] == ["job-1"]

    # Two servers on the one database (a fresh process each would see the same), both holding the same request
    # in their micro-batch queue at once: the unique (key, request_id) lets one row in, the other answers from it.
    slow = cfg.model_copy(update={"max_delay_ms": 400.0})
    with running_server(slow, model=model) as a, running_server(slow, model=model) as b:
        stubs = [stub(a.address), stub(b.address)]
        after = stubs[0][1].Infer(image_request(images, keep, request_id="job-1"), metadata=auth(key))
        assert after.usage.replayed and after.logits.data == first.logits.data  # restart: still billed once
        barrier = threading.Barrier(4)

        def call(i: int) -> pb.InferResponse:
            barrier.wait()
            request = image_request(images, keep, request_id="job-2")
            return stubs[i % 2][1].Infer(request, metadata=auth(key))

        with ThreadPoolExecutor(max_workers=4) as pool:
            answers = list(pool.map(call, range(4)))
        for channel, _ in stubs:
            channel.close()
    assert sum(not a.usage.replayed for a in answers) == 1
    assert len({a.logits.data for a in answers}) == 1
    rows = usage_rows(postgres_url)
    assert [r["request_id"] for r in rows] == ["job-1", "job-2"]
    assert rows[1]["gflops"] == answers[0].usage.gflops == first.usage.gflops  # same images, same keep count


def test_insert_usage_rows_settles_duplicates_with_savepoints(postgres_url: str) -> None:
    sessions = database.open_ledger(postgres_url)
    with sessions() as s:
        key = keys.add_api_key(s, name="k", key_prefix="mkd_x", key_hash="h" * 64)
        with pytest.raises(models.DuplicateKeyNameError):
            keys.add_api_key(s, name="k", key_prefix="mkd_y", key_hash="g" * 64)

    def item(rid: str, gflops: float) -> billing.Billable:
        return kit.billable(key.id, rid, gflops, digest=rid * 64, payload=(b"\x01\x02\x03\x04", "1,1"))

    with sessions() as s:
        assert billing.bill(s, items=[item("a", 1.0)], replay_ttl_s=60) == [None]
    with sessions() as s:
        outcome = billing.bill(s, items=[item("b", 1.5), item("a", 9.0), item("c", 0.5)], replay_ttl_s=60)
    assert outcome[0] is None and outcome[2] is None
    assert outcome[1] is not None and outcome[1].gflops == 1.0 and outcome[1].content_digest == "a" * 64
    assert pg_rows(postgres_url, "SELECT request_id, gflops FROM usage ORDER BY request_id") == [
        ("a", 1.0),
        ("b", 1.5),
        ("c", 0.5),
    ]
    assert pg_rows(postgres_url, "SELECT COUNT(*), MIN(length(logits)) FROM replay_payloads") == [(3, 4)]
    assert pg_rows(postgres_url, "SELECT requests, gflops FROM key_counters") == [(3, 3.0)]
    with sessions() as s:
        assert reports.used_gflops(s, api_key_id=key.id) == 3.0
    sessions.kw["bind"].dispose()


def test_quota_refuses_with_resource_exhausted_and_bills_nothing(postgres_url: str, model) -> None:
    with running_server(pg_settings(postgres_url, max_delay_ms=200.0), model=model) as srv:
        channel, teacher = stub(srv.address)
        key, images, keep, cost, codes = kit.quota_race(
            srv, teacher, quota=2.5, calls=5, needles=("nothing was billed",)
        )
        assert codes.count(grpc.StatusCode.OK) == 2
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 3
        with pytest.raises(grpc.RpcError) as err:
            teacher.Infer(image_request(images, keep, request_id="late"), metadata=auth(key))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        channel.close()
    ok_ids = sorted(f"q{i}" for i, c in enumerate(codes) if c == grpc.StatusCode.OK)
    assert pg_rows(
        postgres_url,
        "SELECT u.request_id, u.gflops FROM usage u JOIN api_keys k ON k.id = u.api_key_id "
        "WHERE k.name = 'erin' ORDER BY u.request_id",
    ) == [(i, cost) for i in ok_ids]


def test_request_id_with_a_nul_character_is_invalid_and_not_billed(postgres_url: str, model) -> None:
    """Postgres text cannot hold NUL: the server must refuse it up front, not fail inside the ledger."""
    with running_server(pg_settings(postgres_url), model=model) as srv:
        key = srv.create_key("nul")
        channel, teacher = stub(srv.address)
        request = image_request(random_images(1, 1), random_keep(1, 8, 1), request_id="job\x00-1")
        with pytest.raises(grpc.RpcError) as err:
            teacher.Infer(request, metadata=auth(key))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "NUL" in err.value.details()
        ok = teacher.Infer(
            image_request(random_images(1, 1), random_keep(1, 8, 1), request_id="job-1"), metadata=auth(key)
        )
        assert not ok.usage.replayed
        channel.close()
    assert [r["request_id"] for r in usage_rows(postgres_url)] == ["job-1"]


def test_cli_keys_and_usage_against_postgres(postgres_url: str, model) -> None:
    def cli_together(*calls: tuple[str, ...], db: str = postgres_url) -> list[subprocess.CompletedProcess[str]]:
        with ThreadPoolExecutor(max_workers=len(calls)) as pool:  # separate processes, at the same time
            return list(pool.map(lambda args: run_cli(*args, db=db), calls))

    # on a fresh database: the processes race to create the schema, and all must succeed
    created, made_other, too_long = cli_together(
        ("keys", "create", "--name", "grace", "--quota-gflops", "1000", "--price-per-gflop", "0.2"),
        ("keys", "create", "--name", "heidi"),
        ("keys", "create", "--name", "x" * 201),
    )
    assert created.returncode == made_other.returncode == 0, created.stderr + made_other.stderr
    secret, other = created.stdout.strip(), made_other.stdout.strip()
    assert too_long.returncode == 2 and too_long.stderr.count("\n") == 1 and "200 characters" in too_long.stderr
    assert pg_rows(
        postgres_url, "SELECT name, key_prefix, quota_gflops, price_per_gflop, disabled FROM api_keys ORDER BY name"
    ) == [("grace", secret[:12], 1000.0, 0.2, False), ("heidi", other[:12], None, None, False)]

    with running_server(pg_settings(postgres_url), model=model) as srv:  # keys made by another process work
        channel, teacher = stub(srv.address)
        served = [
            teacher.Infer(
                image_request(random_images(1 + i, i), random_keep(1 + i, 10 + 5 * i, i), request_id=f"c{i}"),
                metadata=auth(secret),
            ).usage
            for i in range(3)
        ]
        teacher.Infer(image_request(random_images(1, 9), random_keep(1, 8, 9)), metadata=auth(other))
        disabled = run_cli("keys", "disable", "heidi", db=postgres_url)
        assert disabled.returncode == 0, disabled.stderr
        srv.invalidate_key_cache()
        time.sleep(0.1)
        with pytest.raises(grpc.RpcError) as err:
            teacher.Infer(image_request(random_images(1, 9), random_keep(1, 8, 9)), metadata=auth(other))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "disabled" in err.value.details()
        channel.close()

    listing, usage, table = cli_together(("keys", "list", "--json"), ("usage", "--key", "grace", "--json"), ("usage",))
    listed = {k["name"]: k for k in json.loads(listing.stdout)}
    assert (listed["grace"]["disabled"], listed["heidi"]["disabled"]) == (False, True)
    assert secret not in listing.stdout and listed["grace"]["prefix"] == secret[:12]
    (totals,) = json.loads(usage.stdout)
    assert (totals["requests"], totals["images"], totals["tokens"]) == (
        3,
        sum(u.images for u in served),
        sum(u.tokens for u in served),
    )
    for field in ("gflops", "full_gflops", "cost"):
        assert totals[field] == pytest.approx(math.fsum(getattr(u, field) for u in served), rel=REL)
    ((sql_gflops,),) = pg_rows(
        postgres_url, "SELECT SUM(u.gflops) FROM usage u JOIN api_keys k ON k.id = u.api_key_id WHERE k.name = 'grace'"
    )
    assert totals["gflops"] == sql_gflops
    assert table.returncode == 0 and "grace" in table.stdout and "heidi" in table.stdout and "%" in table.stdout

    unreachable = run_cli("usage", db="postgresql+psycopg2://bob:s3cret-pw@127.0.0.1:1/nowhere")
    assert unreachable.returncode == 2 and unreachable.stderr.count("\n") == 1
    assert "cannot open ledger" in unreachable.stderr and "s3cret-pw" not in unreachable.stderr


def test_servers_opening_a_fresh_database_together_create_the_schema_once(postgres_url: str) -> None:
    barrier = threading.Barrier(4)

    def open_it(_: int) -> str:
        barrier.wait()  # all CREATE TABLEs at once, each on its own engine (as separate processes would)
        sessions = database.open_ledger(postgres_url)
        sessions.kw["bind"].dispose()
        return "ok"

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(open_it, range(4))) == ["ok"] * 4
    tables = pg_rows(
        postgres_url,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY table_name",
    )
    assert tables == [
        ("alembic_version",),
        ("api_keys",),
        ("key_counters",),
        ("quota_holds",),
        ("refusals",),
        ("replay_payloads",),
        ("usage",),
    ]
    assert pg_rows(postgres_url, "SELECT version_num FROM alembic_version") == [(head_revision(),)]


def test_dashboard_usage_equals_raw_sql_on_postgres(postgres_url: str, model) -> None:
    with running_server(pg_settings(postgres_url), model=model) as srv:
        keys = {"alpha": srv.create_key("alpha"), "beta": srv.create_key("beta", price_per_gflop=0.5)}
        srv.create_key("idle", quota_gflops=10.0)
        channel, teacher = stub(srv.address)
        for i in range(10):
            name = "alpha" if i % 3 else "beta"
            teacher.Infer(
                image_request(random_images(1 + i % 2, i), random_keep(1 + i % 2, 6 + 5 * i, i)),
                metadata=auth(keys[name]),
            )
        channel.close()
    # spread the rows over the last hours (raw SQL), so time windows and buckets have something to cut
    pg_rows(
        postgres_url, "UPDATE usage SET created_at = created_at - make_interval(mins => (id * 37) % 300)", commit=True
    )
    sums = (
        "COUNT(u.id), COALESCE(SUM(u.images), 0), COALESCE(SUM(u.tokens), 0), COALESCE(SUM(u.gflops), 0), "
        "COALESCE(SUM(u.full_gflops), 0), COALESCE(SUM(u.cost), 0)"
    )

    def sql_totals(where: str = "", params: tuple[Any, ...] = ()) -> dict[str, tuple[Any, ...]]:
        query = (
            f"SELECT k.name, {sums} FROM api_keys k LEFT JOIN usage u ON u.api_key_id = k.id {where} GROUP BY k.name"
        )
        return {r[0]: r[1:] for r in pg_rows(postgres_url, query, params)}

    def check(body: dict[str, Any], expected: dict[str, tuple[Any, ...]]) -> None:
        assert [k["key"] for k in body["keys"]] == sorted(expected)
        for k in body["keys"]:
            requests, images, tokens, gflops, full, cost = expected[k["key"]]
            assert (k["requests"], k["images"], k["tokens"]) == (requests, images, tokens)
            assert k["gflops"] == pytest.approx(gflops, rel=REL) and k["cost"] == pytest.approx(cost, rel=REL)
            assert k["full_gflops"] == pytest.approx(full, rel=REL)

    viewer = "pg-viewer-token"  # the read views need a token since the lock-down
    client = TestClient(
        create_app(pg_settings(postgres_url, viewer_token=viewer)),
        raise_server_exceptions=False,
        headers={"Authorization": f"Bearer {viewer}"},
    )
    body = client.get("/api/usage/keys").json()
    expected = sql_totals()
    for path in ("/api/usage/keys", "/api/usage/timeseries", "/api/usage/latency"):  # Postgres text holds no NUL
        assert client.get(path, params={"key": "alpha\x00"}).status_code == 422
    check(body, expected)
    assert expected["idle"][0] == 0 and all(expected[k][0] > 0 for k in keys)
    last = dict(
        pg_rows(
            postgres_url,
            "SELECT k.name, MAX(u.created_at) FROM usage u JOIN api_keys k ON k.id = u.api_key_id GROUP BY k.name",
        )
    )
    for k in body["keys"]:
        want = last.get(k["key"])
        got = k["last_used_at"] and datetime.fromisoformat(k["last_used_at"])
        assert got == want  # aware datetimes: equal instants, whatever zone each side is in

    now = datetime.now(UTC)
    since, until = now - timedelta(minutes=200), now - timedelta(minutes=60)
    window = client.get("/api/usage/keys", params={"since": since.isoformat(), "until": until.isoformat()}).json()
    cut = sql_totals("AND u.created_at >= %s AND u.created_at < %s", (since, until))
    assert any(cut[k][0] != expected[k][0] for k in cut)  # the window really cuts
    check(window, cut)

    series = client.get("/api/usage/timeseries", params={"bucket": "minute"}).json()
    cells: dict[tuple[str, int], list[float]] = defaultdict(lambda: [0, 0.0])
    for name, created, gflops in pg_rows(
        postgres_url, "SELECT k.name, u.created_at, u.gflops FROM usage u JOIN api_keys k ON k.id = u.api_key_id"
    ):
        cell = cells[(name, int(created.timestamp()) // 60 * 60)]  # bucketing in Python, on true UTC instants
        cell[0] += 1
        cell[1] += gflops
    got = {
        (s["key"], t): [s["requests"][i], s["gflops"][i]]
        for s in series["series"]
        for i, t in enumerate(series["timestamps"])
        if s["requests"][i]
    }
    assert got.keys() == cells.keys()
    for cell, (requests, gflops) in cells.items():
        assert got[cell][0] == requests and got[cell][1] == pytest.approx(gflops, rel=REL)
