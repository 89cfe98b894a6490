"""Reports read from the ledger, through a real server on SQLite and on Postgres: refused calls of every kind are
counted per key and reason (and never billed); the price and currency billed are stored with each row, and the
standalone dashboard and `teacher-server usage`, started with another price and currency, show the billed ones;
the per-day CSV sums equal the rows read back with SQL. Requests sent with purpose 'probe' are stored as such and every
report shows their GFLOPs and cost beside the totals; a bad purpose is refused, counted and not billed. A missing ledger
file is an error, not a new ledger."""

from __future__ import annotations

import csv
import io
import json
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from dtype_marks import child_env
from postgres_testkit import pg_rows, postgres_server, postgres_url  # noqa: F401 (fixtures)
from service_testkit import auth, image_request, random_images, random_keep, settings, stub, tiny_vit

from teacher_server.testing.server import running_server

pytestmark = [pytest.mark.dtype("float32"), pytest.mark.timeout(240)]

CLI = [sys.executable, "-m", "teacher_server.cli"]
SERVED_PRICE, SERVED_CURRENCY = 5e-6, "EUR"
OTHER_ENV = {"MASKEDKD_PRICE_PER_GFLOP": "0.001", "MASKEDKD_CURRENCY": "USD"}  # what the readers start with
VIEWER_TOKEN = "reports-viewer-token-0123456789"


@pytest.fixture(params=["sqlite", "postgres"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return str(request.getfixturevalue("postgres_url"))


def sql(url: str, query: str) -> list[tuple[Any, ...]]:
    """Raw SQL through the database's own driver (sqlite3 / psycopg2), not the ledger's code."""
    if url.startswith("sqlite"):
        import sqlite3

        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            return conn.execute(query).fetchall()
    return pg_rows(url, query)


def reader_env() -> dict[str, str]:
    env = child_env()
    return {**env, **OTHER_ENV, "MASKEDKD_VIEWER_TOKEN": VIEWER_TOKEN}


def refuse(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as refused:
        call()
    return refused.value.code()


@contextmanager
def standalone_dashboard(ledger_url: str) -> Iterator[str]:
    """`python -m teacher_server.dashboard` on the ledger, started with another default price and currency."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "teacher_server.dashboard", "--db", ledger_url, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=reader_env(),
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                httpx.get(url + "/healthz", timeout=2)
                break
            except httpx.HTTPError:
                assert process.poll() is None and time.monotonic() < deadline, process.stdout and process.stdout.read()
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(10)


def serve_bill_and_refuse(tmp_path: Path, ledger_url: str) -> dict[str, Any]:
    """Bill alice twice (the second as a probe) and make refused calls of each kind; returns the keys' ids and the
    billed usages."""
    cfg = settings(tmp_path, db=ledger_url, price_per_gflop=SERVED_PRICE, currency=SERVED_CURRENCY, auth_cache_s=0.0)
    with running_server(cfg, model=tiny_vit(seed=1)) as srv:
        alice = auth(srv.create_key("alice"))
        broke = auth(srv.create_key("broke", quota_gflops=1e-9))
        slow = auth(srv.create_key("slow", rate_limit_gflops_per_min=1e-9))
        channel, teacher = stub(srv.address)
        sent = [
            image_request(random_images(2, i), random_keep(2, 16 + 8 * i, i), request_id=f"ok-{i}") for i in range(2)
        ]
        sent[1].purpose = "probe"  # a `--keep auto` fidelity probe: billed the same, reported apart
        billed = [teacher.Infer(r, metadata=alice).usage for r in sent]
        bad_label = image_request(random_images(1, 9), random_keep(1, 16, 9), request_id="bad-label")
        bad_label.purpose = "Probe!"
        request = image_request(random_images(1, 9), random_keep(1, 16, 9), request_id="x")
        codes = Counter(
            [
                refuse(lambda: teacher.Infer(request, metadata=auth("mkd_wrong-secret"))),
                refuse(lambda: teacher.Infer(request)),  # no key at all
                refuse(lambda: teacher.Infer(request, metadata=broke)),
                refuse(lambda: teacher.Infer(request, metadata=slow)),
                refuse(
                    lambda: teacher.Infer(
                        image_request(random_images(1, 9), random_keep(1, 16, 9), request_id="nul\x00"), metadata=alice
                    )
                ),
                refuse(
                    lambda: teacher.Infer(
                        image_request(random_images(1, 9), random_keep(1, 16, 9), model="no-such-model"), metadata=alice
                    )
                ),
                refuse(lambda: teacher.Infer(bad_label, metadata=alice)),
            ]
        )
        channel.close()
    ids = dict(sql(ledger_url, "SELECT name, id FROM api_keys"))
    assert codes == {
        grpc.StatusCode.UNAUTHENTICATED: 2,
        grpc.StatusCode.RESOURCE_EXHAUSTED: 2,
        grpc.StatusCode.INVALID_ARGUMENT: 2,
        grpc.StatusCode.NOT_FOUND: 1,
    }
    return {"ids": ids, "billed": billed}


def test_refusals_and_billed_prices_read_back_with_sql_and_shown_as_billed(tmp_path: Path, ledger_url: str) -> None:
    run = serve_bill_and_refuse(tmp_path, ledger_url)
    ids, billed = run["ids"], run["billed"]

    # the ledger: only alice's two calls billed, at the served price and currency; every refusal counted
    assert sorted(sql(ledger_url, "SELECT request_id, price_per_gflop, currency, purpose FROM usage")) == [
        ("ok-0", SERVED_PRICE, SERVED_CURRENCY, ""),
        ("ok-1", SERVED_PRICE, SERVED_CURRENCY, "probe"),
    ]
    ((probe_n, probe_gflops, probe_cost),) = sql(
        ledger_url, "SELECT COUNT(*), SUM(gflops), SUM(cost) FROM usage WHERE purpose = 'probe'"
    )
    assert probe_n == 1 and probe_gflops == pytest.approx(billed[1].gflops, rel=1e-12)
    for gflops, cost in sql(ledger_url, "SELECT gflops, cost FROM usage"):
        assert cost == pytest.approx(gflops * SERVED_PRICE, rel=1e-12)
    refused = {
        (key, reason): n
        for _, key, reason, n in sql(ledger_url, "SELECT day_start, api_key_id, reason, count FROM refusals")
    }
    assert refused == {
        (0, "auth"): 2,
        (ids["broke"], "quota"): 1,
        (ids["slow"], "rate_limit"): 1,
        (ids["alice"], "invalid"): 3,
    }
    ((day,),) = ({r[0] for r in sql(ledger_url, "SELECT day_start FROM refusals")},)
    assert day % 86400 == 0 and abs(time.time() - day) < 2 * 86400

    # the standalone dashboard, started with 0.001 USD as its default: shows what was billed
    viewer = {"Authorization": f"Bearer {VIEWER_TOKEN}"}
    with standalone_dashboard(ledger_url) as dashboard:
        body = httpx.get(dashboard + "/api/usage/keys", headers=viewer, timeout=10).json()
        daily = httpx.get(dashboard + "/api/usage/daily", headers=viewer, timeout=10).json()
        exported = httpx.get(dashboard + "/api/usage/daily.csv", headers=viewer, timeout=10)
    keys = {k["key"]: k for k in body["keys"]}
    assert body["currency"] == SERVED_CURRENCY
    assert body["cost_by_currency"] == [
        {"currency": SERVED_CURRENCY, "requests": 2, "cost": pytest.approx(sum(u.cost for u in billed), rel=1e-9)}
    ]
    assert [(b["price_per_gflop"], b["currency"], b["requests"]) for b in keys["alice"]["billed"]] == [
        (SERVED_PRICE, SERVED_CURRENCY, 2)
    ]
    assert {name: k["refused"] for name, k in keys.items()} == {
        "alice": {"invalid": 3},
        "broke": {"quota": 1},
        "slow": {"rate_limit": 1},
    }
    assert body["refused_without_key"] == {"auth": 2}
    alice = keys["alice"]
    assert [(p["purpose"], p["currency"], p["requests"], p["gflops"], p["cost"]) for p in alice["by_purpose"]] == [
        ("", SERVED_CURRENCY, 1, pytest.approx(billed[0].gflops, rel=1e-12), pytest.approx(billed[0].cost, rel=1e-12)),
        ("probe", SERVED_CURRENCY, 1, pytest.approx(probe_gflops, rel=1e-12), pytest.approx(probe_cost, rel=1e-12)),
    ]
    for totals in (alice, body["total"]):
        assert (totals["probe_requests"], totals["probe_gflops"], totals["probe_cost"]) == (
            1,
            pytest.approx(probe_gflops, rel=1e-12),
            pytest.approx(probe_cost, rel=1e-12),
        )
    assert (keys["broke"]["by_purpose"], keys["broke"]["probe_gflops"]) == ([], 0.0)

    # per day: JSON and CSV equal the rows read back with SQL
    assert [(d["key"], d["currency"], d["price_per_gflop"], d["requests"]) for d in daily["days"]] == [
        ("alice", SERVED_CURRENCY, SERVED_PRICE, 2)
    ]
    assert {(r["key"], r["reason"]): r["count"] for r in daily["refusals"]} == {
        ("alice", "invalid"): 3,
        ("broke", "quota"): 1,
        ("slow", "rate_limit"): 1,
        (None, "auth"): 2,
    }
    assert [(d["probe_requests"], d["probe_gflops"], d["probe_cost"]) for d in daily["days"]] == [
        (1, pytest.approx(probe_gflops, rel=1e-12), pytest.approx(probe_cost, rel=1e-12))
    ]
    assert exported.headers["content-type"].startswith("text/csv")
    cli_csv = subprocess.run(
        [*CLI, "usage", "--db", ledger_url, "--csv"], capture_output=True, text=True, timeout=60, env=reader_env()
    )
    assert cli_csv.returncode == 0, cli_csv.stderr
    assert cli_csv.stdout == exported.text
    sums: dict[str, float] = defaultdict(float)
    for row in csv.DictReader(io.StringIO(exported.text)):
        assert (row["currency"], float(row["price_per_gflop"])) == (SERVED_CURRENCY, SERVED_PRICE)
        for column in (
            "requests",
            "images",
            "tokens",
            "gflops",
            "full_gflops",
            "cost",
            "probe_requests",
            "probe_gflops",
            "probe_cost",
        ):
            sums[column] += float(row[column])
    ((requests, images, tokens, gflops, full, cost),) = sql(
        ledger_url, "SELECT COUNT(*), SUM(images), SUM(tokens), SUM(gflops), SUM(full_gflops), SUM(cost) FROM usage"
    )
    assert (sums["requests"], sums["images"], sums["tokens"]) == (requests, images, tokens)
    assert [sums["gflops"], sums["full_gflops"], sums["cost"]] == pytest.approx([gflops, full, cost], rel=1e-12)
    assert [sums["probe_requests"], sums["probe_gflops"], sums["probe_cost"]] == pytest.approx(
        [probe_n, probe_gflops, probe_cost], rel=1e-12
    )

    # `teacher-server usage`, with the same other price in its environment
    shown = subprocess.run(
        [*CLI, "usage", "--db", ledger_url, "--json"], capture_output=True, text=True, timeout=60, env=reader_env()
    )
    assert shown.returncode == 0, shown.stderr
    report = {r["key"]: r for r in json.loads(shown.stdout)}
    assert [(b["price_per_gflop"], b["currency"]) for b in report["alice"]["billed"]] == [
        (SERVED_PRICE, SERVED_CURRENCY)
    ]
    assert report["broke"]["refused"] == {"quota": 1} and report[None]["refused"] == {"auth": 2}
    assert [(p["purpose"], p["currency"], p["requests"], p["gflops"]) for p in report["alice"]["by_purpose"]] == [
        ("", SERVED_CURRENCY, 1, pytest.approx(billed[0].gflops, rel=1e-12)),
        ("probe", SERVED_CURRENCY, 1, pytest.approx(probe_gflops, rel=1e-12)),
    ]
    assert report["broke"]["by_purpose"] == [] and report["broke"]["billed"] == []
    table = subprocess.run(
        [*CLI, "usage", "--db", ledger_url], capture_output=True, text=True, timeout=60, env=reader_env()
    )
    alice_line = next(line for line in table.stdout.splitlines() if line.startswith("alice "))
    assert f"{SERVED_CURRENCY}" in alice_line and "5e-06 EUR" in alice_line and "USD" not in table.stdout
    assert "3 (invalid 3)" in alice_line
    share = 100 * probe_gflops / (billed[0].gflops + billed[1].gflops)
    assert f"{probe_gflops:.6f} ({share:.1f}%)" in alice_line and f"{probe_cost:.8f} EUR" in alice_line
    assert "PROBE_GFLOPS (SHARE)" in table.stdout.splitlines()[0]


@pytest.mark.parametrize(
    "command", [[*CLI, "usage"], [sys.executable, "-m", "teacher_server.dashboard", "--port", "0"]]
)
def test_a_missing_ledger_file_is_an_error_not_a_new_ledger(tmp_path: Path, command: list[str]) -> None:
    typo = tmp_path / "ledgr.db"
    result = subprocess.run(
        [*command, "--db", f"sqlite:///{typo}"], capture_output=True, text=True, timeout=60, env=reader_env()
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and f"no ledger at {typo}" in result.stderr
    assert not typo.exists()
