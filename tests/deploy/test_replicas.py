"""Many teacher replicas behind one client target: three `teacher-server serve` processes on one throw-away Postgres
ledger, clients given the address list (round-robin, health-checked, failover under the same request id).

Under load from 48 concurrent clients one replica is killed (SIGKILL) and one is cut off (SIGSTOP, then SIGCONT):
every request is answered, the ledger (read back with SQL) holds exactly one row per request id, and each row is
what the client was told it cost (a replayed answer carries what was billed the first time). A quota race across
the replicas must not overshoot.

The replicas are shared by the module; the failover test kills them, so it runs last (file order).
"""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from dtype_marks import child_env
from grpc_health.v1 import health_pb2
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "teacher_server"))  # the Postgres and service testkits
from postgres_testkit import PostgresServer, pg_rows, postgres_server  # noqa: E402,F401 (fixture)
from service_testkit import MODEL, TINY, random_images, random_keep, settings, tiny_vit  # noqa: E402

from maskedkd.checkpoints import save_model_checkpoint  # noqa: E402
from student_client.errors import TeacherQuotaError, TeacherUnavailableError  # noqa: E402
from student_client.transport.aio_client import AsyncTeacherClient  # noqa: E402
from student_client.transport.channel import grpc_target  # noqa: E402
from student_client.transport.client import TeacherClient  # noqa: E402
from student_client.transport.wire import Usage  # noqa: E402
from teacher_server.launcher import ServerProcess, serve_argv, settings_flags  # noqa: E402
from teacher_server.ledger import database  # noqa: E402
from teacher_server.ledger.keys import create_api_key  # noqa: E402
from teacher_server.service.server import SERVICE_NAME  # noqa: E402
from teacher_server.testing.server import RunningServer, running_server  # noqa: E402

# `make test` starts slow modules first
pytestmark = [pytest.mark.dtype("float32"), pytest.mark.timeout(360), pytest.mark.slow]

REPLICAS = 3
CLIENTS = 48
REQUESTS_PER_CLIENT = 5
REL = 1e-9


@dataclass
class Cluster:
    replicas: list[ServerProcess]
    db: str

    @property
    def target(self) -> str:
        return ",".join(r.address for r in self.replicas)


def replica_process(checkpoint: Path, db: str, log: Path) -> ServerProcess:
    """`teacher-server serve` on free ports (announced once it serves)."""
    served = {"checkpoint": checkpoint, "host": "127.0.0.1", "port": 0, "db": db, "device": "cpu", "metrics_port": 0}
    argv = serve_argv(*settings_flags({**served, "max_delay_ms": 30, "grace_s": 2}))
    return ServerProcess(argv, log=log, env=child_env(OMP_NUM_THREADS="1"), stop_timeout_s=10)


@pytest.fixture(scope="module")
def cluster(
    postgres_server: PostgresServer,  # noqa: F811 (the imported fixture)
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("replicas")
    checkpoint = save_model_checkpoint(
        root / "teacher.safetensors", tiny_vit(seed=3), model_name=MODEL, model_kwargs=TINY
    )  # every replica serves the same weights
    db = postgres_server.create_database("replicas")
    database.open_ledger(db)  # tables exist before three servers race to create them
    replicas = [replica_process(checkpoint, db, root / f"replica{i}.log").launch() for i in range(REPLICAS)]
    try:
        deadline = time.monotonic() + 240  # three torch imports on two busy cores
        for server in replicas:
            server.wait_ready(max(1.0, deadline - time.monotonic()))
        yield Cluster(replicas, db)
    finally:
        for server in replicas:
            if server.alive:
                server.send_signal(signal.SIGCONT)
                server.stop()


def new_key(db: str, name: str, quota_gflops: float | None = None) -> str:
    secret, _ = create_api_key(database.open_ledger(db), name=name, quota_gflops=quota_gflops)
    return secret


def ledger_rows(db: str, key: str) -> dict[str, tuple[float, float, int]]:
    """request_id -> (gflops, cost, rows with that id) for one key, through psycopg2 alone."""
    rows = pg_rows(
        db,
        "SELECT u.request_id, SUM(u.gflops), SUM(u.cost), COUNT(*) FROM usage u "
        "JOIN api_keys k ON k.id = u.api_key_id WHERE k.name = %s GROUP BY u.request_id",
        (key,),
    )
    return {rid: (float(g), float(c), int(n)) for rid, g, c, n in rows}


def request(seed: int) -> dict[str, torch.Tensor]:
    batch = 1 + seed % 2
    return {"images": random_images(batch, seed), "keep_indices": random_keep(batch, 16 + seed % 17, seed)}


def test_address_lists_become_static_grpc_targets() -> None:
    assert grpc_target("127.0.0.1:5001,127.0.0.1:5002") == "ipv4:127.0.0.1:5001,127.0.0.1:5002"
    assert grpc_target("[::1]:5001, [::1]:5002") == "ipv6:[::1]:5001,[::1]:5002"
    assert grpc_target("localhost:5001,127.0.0.2:5002").startswith("ipv")
    for single in ("teacher:50051", "dns:///teacher.ml.svc.cluster.local:50051", "ipv4:10.0.0.1:1,10.0.0.2:1"):
        assert grpc_target(single) == single
    for bad in ("127.0.0.1:5001,127.0.0.1", "", "127.0.0.1:1,[::1]:2"):
        with pytest.raises(ValueError):
            grpc_target(bad)


def test_a_quota_race_across_replicas_never_overshoots(cluster: Cluster) -> None:
    with TeacherClient(cluster.target, new_key(cluster.db, "probe"), max_retries=2) as client:
        _, one = client.infer(**request(0), request_id="probe-0")
    per_request = one.gflops
    quota = 10.5 * per_request  # room for 10 requests, not 11
    secret = new_key(cluster.db, "capped", quota_gflops=quota)
    clients = [TeacherClient(r.address, secret, max_retries=0) for r in cluster.replicas]  # one per replica
    for c in clients:
        c.info()
    start = threading.Barrier(36)
    accepted: dict[str, Usage] = {}
    refused: list[str] = []
    lock = threading.Lock()

    def one_request(i: int) -> None:
        rid = f"q-{i}"
        start.wait()
        try:
            _, usage = clients[i % REPLICAS].infer(**request(0), request_id=rid)
            with lock:
                accepted[rid] = usage
        except TeacherQuotaError:
            with lock:
                refused.append(rid)

    try:
        with ThreadPoolExecutor(36) as pool:
            list(pool.map(one_request, range(36)))
    finally:
        for c in clients:
            c.close()
    rows = ledger_rows(cluster.db, "capped")
    assert len(accepted) + len(refused) == 36
    assert set(rows) == set(accepted), "billed exactly the accepted requests, nothing refused"
    assert sum(g for g, _, _ in rows.values()) == pytest.approx(sum(u.gflops for u in accepted.values()), rel=REL)
    billed = sum(g for g, _, _ in rows.values())
    assert billed <= quota, f"billed {billed:.6g} GFLOPs over a quota of {quota:.6g} ({len(accepted)} accepted)"


def images_served(replica: ServerProcess | RunningServer) -> float:
    """Images this replica billed, from its own /metrics (summed over keys and models)."""
    if isinstance(replica, RunningServer):
        url = replica.metrics_url
    else:
        assert replica.ready is not None and replica.ready.metrics_url is not None
        url = replica.ready.metrics_url
    with urllib.request.urlopen(url, timeout=10) as answer:
        text = answer.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "maskedkd_images"
        for sample in family.samples
        if sample.name == "maskedkd_images_total"
    )


def test_a_replica_that_is_not_serving_gets_no_calls(tmp_path: Path) -> None:
    """Client-side health checking: a replica whose health says NOT_SERVING (draining) is skipped, and used again
    once it is SERVING. Two in-process servers on one SQLite ledger."""
    model = tiny_vit(seed=3)
    with (
        running_server(settings(tmp_path, metrics_port=0), model=model) as a,
        running_server(settings(tmp_path, metrics_port=0), model=model) as b,
    ):
        secret = a.create_key("health")

        def set_health(status: int) -> None:  # what the server does itself when it starts draining
            b._call(b.server.health.set(SERVICE_NAME, status))

        with TeacherClient(f"{a.address},{b.address}", secret) as client:
            set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
            time.sleep(0.5)  # the client's health watch sees the change
            before = [images_served(a), images_served(b)]
            for i in range(6):
                client.infer(**request(2 * i), request_id=f"h-off-{i}")
            skipped = [images_served(a) - before[0], images_served(b) - before[1]]
            set_health(health_pb2.HealthCheckResponse.SERVING)
            time.sleep(0.5)
            before = [images_served(a), images_served(b)]
            for i in range(6):
                client.infer(**request(2 * i), request_id=f"h-on-{i}")
            spread = [images_served(a) - before[0], images_served(b) - before[1]]
    assert skipped == [6, 0], skipped
    assert spread == [3, 3], spread


def test_calls_spread_round_robin_over_every_replica(cluster: Cluster) -> None:
    secret = new_key(cluster.db, "spread")
    before = [images_served(r) for r in cluster.replicas]
    sent = 0
    with TeacherClient(cluster.target, secret) as client:
        for i in range(12):
            sent += client.infer(**request(i), request_id=f"spread-sync-{i}")[1].images

    async def async_calls() -> int:
        async with AsyncTeacherClient(cluster.target, secret) as client:
            return sum(
                [(await client.infer(**request(i), request_id=f"spread-async-{i}"))[1].images for i in range(12)]
            )

    sent += asyncio.run(async_calls())
    per_replica = [after - b for after, b in zip([images_served(r) for r in cluster.replicas], before, strict=True)]
    assert sum(per_replica) == sent == sum(request(i)["images"].shape[0] for i in range(12)) * 2
    assert min(per_replica) >= sent / REPLICAS / 3, f"not spread over the replicas: {per_replica}"
    assert len(ledger_rows(cluster.db, "spread")) == 24


def test_failover_loses_nothing_and_bills_once_when_replicas_die(cluster: Cluster) -> None:
    secret = new_key(cluster.db, "load")
    answers: dict[str, Usage] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()
    started = threading.Barrier(CLIENTS + 1)

    def client_loop(c: int) -> None:
        try:
            with TeacherClient(cluster.target, secret, timeout_s=3.0, max_retries=8, backoff=0.05) as client:
                warm_until = time.monotonic() + 60  # the replicas may answer slowly on a busy machine: not the subject
                while True:
                    try:
                        client.info()
                        break
                    except TeacherUnavailableError:
                        if time.monotonic() > warm_until:
                            raise
                started.wait()
                for i in range(REQUESTS_PER_CLIENT):
                    rid = f"load-{c}-{i}"
                    _, usage = client.infer(**request(c * 100 + i), request_id=rid)
                    with lock:
                        answers[rid] = usage
                    time.sleep(0.2)
        except BaseException as exc:  # noqa: BLE001 - reported below with the request counts
            with lock:
                errors.append(exc)
            started.abort()  # a client that never got going: the load does not start (no effect once it has)

    killed, stopped = cluster.replicas[0], cluster.replicas[1]
    threads = [threading.Thread(target=client_loop, args=(c,), daemon=True) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        started.wait(timeout=120)
    except threading.BrokenBarrierError:
        first = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)][:3]
        pytest.fail(f"not every client could start: {first}")
    deadline = time.monotonic() + 60
    while len(answers) < CLIENTS and time.monotonic() < deadline:  # under way: about one answer per client
        time.sleep(0.05)
    answered_at_kill = len(answers)
    served_by_killed = images_served(killed)
    killed.send_signal(signal.SIGKILL)
    time.sleep(0.4)
    stopped.send_signal(signal.SIGSTOP)
    time.sleep(3.5)  # longer than a call's deadline: calls to it time out and are retried elsewhere
    stopped.send_signal(signal.SIGCONT)
    for t in threads:
        t.join(timeout=90)
    assert not errors, errors[:3]
    total = CLIENTS * REQUESTS_PER_CLIENT
    assert 0 < answered_at_kill < total, "the replica died mid-load"
    assert served_by_killed > 0 and images_served(stopped) > 0, "both failed replicas had taken part of the load"
    assert killed.wait(timeout_s=5) == -signal.SIGKILL
    # the survivors flush the ledger on a graceful stop; late commits of the cut-off replica land before we read
    for survivor in cluster.replicas[1:]:
        survivor.stop(timeout_s=15)
    rows = ledger_rows(cluster.db, "load")
    assert len(answers) == total, "every request answered"
    assert set(rows) == set(answers), "one ledger entry per request id, nothing else"
    assert [rid for rid, (_, _, n) in rows.items() if n != 1] == [], "nothing billed twice"
    for rid, usage in answers.items():  # a replayed answer carries exactly what was billed the first time
        assert rows[rid][0] == pytest.approx(usage.gflops, rel=REL), rid
        assert rows[rid][1] == pytest.approx(usage.cost, rel=REL), rid
    assert sum(g for g, _, _ in rows.values()) == pytest.approx(sum(u.gflops for u in answers.values()), rel=REL)
    fresh = [u for u in answers.values() if not u.replayed]
    replayed = total - len(fresh)
    print(f"{total} requests, {replayed} answered by replay after a failover")
    assert sum(u.gflops for u in fresh) <= sum(g for g, _, _ in rows.values()) * (1 + REL)
