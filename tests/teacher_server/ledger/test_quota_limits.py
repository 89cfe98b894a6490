"""Quota windows and rate limits over real gRPC: the x-ratelimit-* / x-quota-* metadata of every answer, the
google.rpc QuotaFailure and RetryInfo details of RESOURCE_EXHAUSTED, windows that start over, the `keys quota` CLI,
and two servers on one Postgres that never overshoot a quota together (the ledger read back with SQL)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from dtype_marks import child_env
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from postgres_testkit import pg_rows, postgres_server, postgres_url  # noqa: F401 (fixtures)
from service_testkit import auth, image_request, random_images, random_keep, settings, stub, tiny_vit

from teacher_server.testing.server import running_server

pytestmark = [pytest.mark.dtype("float32"), pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_vit(seed=9)


def sql(db_url: str, query: str) -> list[tuple]:
    with sqlite3.connect(db_url.removeprefix("sqlite:///")) as conn:
        return conn.execute(query).fetchall()


def clear_of_boundary(period_s: int, margin_s: float) -> None:
    """Start a timed check well inside a window of `period_s` seconds (UTC), not just before it turns over."""
    left = period_s - time.time() % period_s
    if left < margin_s:
        time.sleep(left + 0.1)


def details_of(err: grpc.RpcError) -> tuple[error_details_pb2.QuotaFailure, error_details_pb2.RetryInfo | None]:
    status = rpc_status.from_call(err)
    assert status is not None and status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    failure, retry = error_details_pb2.QuotaFailure(), None
    for detail in status.details:
        if detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            detail.Unpack(failure)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
    return failure, retry


def test_quota_window_metadata_details_and_a_new_window(tmp_path, model) -> None:
    with running_server(settings(tmp_path), model=model) as srv:
        channel, teacher = stub(srv.address)
        images, keep = random_images(1, 1), random_keep(1, 16, 1)
        cost = teacher.Infer(image_request(images, keep), metadata=auth(srv.create_key("probe"))).usage.gflops
        quota = 2.5 * cost
        secret = srv.create_key("day-key", quota_gflops=quota, quota_window="day")
        clear_of_boundary(86400, 60.0)
        for i in range(2):
            _, call = teacher.Infer.with_call(image_request(images, keep, request_id=f"d{i}"), metadata=auth(secret))
            md = dict(call.initial_metadata())
            used = sql(
                srv.settings.db,
                "SELECT SUM(u.gflops) FROM usage u JOIN api_keys k ON k.id = u.api_key_id WHERE k.name = 'day-key'",
            )[0][0]
            assert float(md["x-quota-limit-gflops"]) == pytest.approx(quota, rel=1e-8)
            assert float(md["x-quota-remaining-gflops"]) == pytest.approx(quota - used, rel=1e-8)
            assert md["x-quota-window"] == "day" and 0 < float(md["x-quota-reset"].rstrip("s")) <= 86400
            assert "x-ratelimit-limit-gflops" not in md  # no rate limit on this key
        with pytest.raises(grpc.RpcError) as err:
            teacher.Infer(image_request(images, keep, request_id="d2"), metadata=auth(secret))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "day quota" in err.value.details()
        failure, retry = details_of(err.value)
        assert [v.subject for v in failure.violations] == ["api_key:day-key"]
        assert retry is not None and 0 < retry.retry_delay.seconds <= 86400  # when the next UTC day starts
        trailing = dict(err.value.trailing_metadata())
        assert float(trailing["x-quota-remaining-gflops"]) == pytest.approx(quota - 2 * cost, rel=1e-8)
        assert sql(
            srv.settings.db,
            "SELECT COUNT(*) FROM usage u JOIN api_keys k ON k.id = u.api_key_id WHERE k.name = 'day-key'",
        ) == [(2,)]
        # The window's day is over (moved back in the ledger, as the next day would find it): room again.
        with sqlite3.connect(srv.settings.db.removeprefix("sqlite:///")) as conn:
            conn.execute(
                "UPDATE key_counters SET window_start = window_start - 86400 WHERE api_key_id = "
                "(SELECT id FROM api_keys WHERE name = 'day-key')"
            )
        assert not teacher.Infer(image_request(images, keep, request_id="d2"), metadata=auth(secret)).usage.replayed
        assert sql(
            srv.settings.db,
            "SELECT requests, window_gflops, reserved_gflops FROM key_counters c JOIN "
            "api_keys k ON k.id = c.api_key_id WHERE k.name = 'day-key'",
        ) == [(3, pytest.approx(cost, rel=1e-12), pytest.approx(0.0, abs=1e-12))]
        channel.close()


def test_rate_limit_per_minute_with_metadata_and_retry_info(tmp_path, model) -> None:
    with running_server(settings(tmp_path), model=model) as srv:
        channel, teacher = stub(srv.address)
        images, keep = random_images(1, 2), random_keep(1, 24, 2)
        cost = teacher.Infer(image_request(images, keep), metadata=auth(srv.create_key("probe"))).usage.gflops
        secret = srv.create_key("rl", rate_limit_gflops_per_min=2.5 * cost)
        clear_of_boundary(60, 20.0)
        remaining = []
        for i in range(2):
            _, call = teacher.Infer.with_call(image_request(images, keep, request_id=f"r{i}"), metadata=auth(secret))
            md = dict(call.initial_metadata())
            assert float(md["x-ratelimit-limit-gflops"]) == pytest.approx(2.5 * cost, rel=1e-8)
            assert 0 < float(md["x-ratelimit-reset-gflops"].rstrip("s")) <= 60
            remaining.append(float(md["x-ratelimit-remaining-gflops"]))
        assert remaining == pytest.approx([1.5 * cost, 0.5 * cost], rel=1e-8)
        with pytest.raises(grpc.RpcError) as err:
            teacher.Infer(image_request(images, keep, request_id="r2"), metadata=auth(secret))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate limit" in err.value.details()
        failure, retry = details_of(err.value)
        assert "per minute" in failure.violations[0].description
        assert retry is not None and retry.retry_delay.seconds <= 60
        replay = teacher.Infer(image_request(images, keep, request_id="r0"), metadata=auth(secret))
        assert replay.usage.replayed  # a replay is not new usage: never rate limited
        assert sql(
            srv.settings.db, "SELECT COUNT(*) FROM usage u JOIN api_keys k ON k.id = u.api_key_id WHERE k.name = 'rl'"
        ) == [(2,)]
        channel.close()


def test_cli_keys_quota_sets_window_and_rate_limit(tmp_path) -> None:
    db = f"sqlite:///{tmp_path / 'l.db'}"
    env = child_env()
    cli = [sys.executable, "-m", "teacher_server.cli"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *args, "--db", db], capture_output=True, text=True, timeout=60, env=env)

    assert run("keys", "create", "--name", "team", "--quota-gflops", "50", "--quota-window", "month").returncode == 0
    assert (
        run(
            "keys", "quota", "team", "--quota-gflops", "10", "--quota-window", "day", "--rate-limit-gflops-per-min", "2"
        ).returncode
        == 0
    )
    assert sql(db, "SELECT quota_gflops, quota_window, rate_limit_gflops_per_min FROM api_keys") == [(10.0, "day", 2.0)]
    assert run("keys", "quota", "team", "--quota-gflops", "none").returncode == 0
    assert sql(db, "SELECT quota_gflops, quota_window, rate_limit_gflops_per_min FROM api_keys") == [
        (None, "lifetime", None)
    ]
    bad = run("keys", "quota", "team", "--quota-gflops", "5", "--quota-window", "week")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    missing = run("keys", "quota", "nobody", "--quota-gflops", "5")
    assert missing.returncode == 2 and "no API key named 'nobody'" in missing.stderr


def test_two_servers_on_one_postgres_never_overshoot_a_quota_together(postgres_url: str, model) -> None:
    from test_ledger_postgres import pg_settings

    with (
        running_server(pg_settings(postgres_url, max_delay_ms=30.0), model=model) as a,
        running_server(pg_settings(postgres_url, max_delay_ms=30.0), model=model) as b,
    ):
        ca, ta = stub(a.address)
        cb, tb = stub(b.address)
        images, keep = random_images(1, 5), random_keep(1, 20, 5)
        cost = ta.Infer(image_request(images, keep), metadata=auth(a.create_key("probe"))).usage.gflops
        quota = 5.5 * cost
        secret = a.create_key("shared", quota_gflops=quota)
        codes: list[grpc.StatusCode] = []
        lock = threading.Lock()

        def call(i: int) -> None:
            teacher = ta if i % 2 == 0 else tb
            try:
                teacher.Infer(image_request(images, keep, request_id=f"q{i}"), metadata=auth(secret))
                code = grpc.StatusCode.OK
            except grpc.RpcError as err:
                code = err.code()
            with lock:
                codes.append(code)

        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(call, range(16)))
        billed = pg_rows(
            postgres_url,
            "SELECT COUNT(*), COALESCE(SUM(u.gflops), 0) FROM usage u "
            "JOIN api_keys k ON k.id = u.api_key_id WHERE k.name = 'shared'",
        )[0]
        assert codes.count(grpc.StatusCode.OK) == billed[0] == 5
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 11
        assert billed[1] <= quota
        assert pg_rows(
            postgres_url,
            "SELECT c.requests, c.gflops, c.window_gflops, c.reserved_gflops FROM "
            "key_counters c JOIN api_keys k ON k.id = c.api_key_id "
            "WHERE k.name = 'shared'",
        ) == [
            (5, pytest.approx(billed[1], rel=1e-12), pytest.approx(billed[1], rel=1e-12), pytest.approx(0.0, abs=1e-9))
        ]
        assert pg_rows(postgres_url, "SELECT COUNT(*) FROM quota_holds") == [(0,)]
        ca.close()
        cb.close()
