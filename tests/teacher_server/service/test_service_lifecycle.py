"""Graceful shutdown of a real server: health says NOT_SERVING first, an in-flight request still finishes and is
billed, new calls are refused afterwards, and the ledger file is complete once stop() returns. A connection age ends
connections so that clients re-resolve the teacher's DNS name."""

from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from service_testkit import auth, image_request, ledger_rows, random_images, random_keep, settings, stub, tiny_vit

from maskedkd.v1 import teacher_pb2 as pb
from maskedkd.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.testing.server import RunningServer, running_server

pytestmark = [pytest.mark.dtype("float32"), pytest.mark.timeout(120)]


def test_graceful_shutdown_finishes_in_flight_requests(tmp_path) -> None:
    # A long batching delay keeps the request in flight while the shutdown starts.
    cfg = settings(tmp_path, max_delay_ms=1500.0, drain_s=0.3, grace_s=20.0)
    srv = RunningServer(cfg, model=tiny_vit())
    key = srv.create_key("frank")
    channel, teacher = stub(srv.address)
    health = health_pb2_grpc.HealthStub(channel)
    statuses: list[int] = []
    watch = health.Watch(health_pb2.HealthCheckRequest(service="maskedkd.v1.TeacherService"))

    def follow_health() -> None:
        try:
            for update in watch:
                statuses.append(update.status)
        except grpc.RpcError:
            pass  # cancelled below, or the server went away

    outcome: dict[str, object] = {}

    def in_flight() -> None:
        try:
            outcome["response"] = teacher.Infer(
                image_request(random_images(1, 1), random_keep(1, 10, 1), request_id="last-one"), metadata=auth(key)
            )
        except grpc.RpcError as err:  # pragma: no cover - reported by the assertion below
            outcome["error"] = err

    watcher = threading.Thread(target=follow_health)
    watcher.start()
    caller = threading.Thread(target=in_flight)
    caller.start()
    time.sleep(0.5)  # the request is queued, waiting for company
    assert "response" not in outcome
    started = time.monotonic()
    srv.stop()  # blocks until the server is down
    stop_s = time.monotonic() - started
    caller.join(timeout=30)
    watch.cancel()
    watcher.join(timeout=30)

    assert "error" not in outcome, outcome.get("error")
    assert outcome["response"].request_id == "last-one"  # type: ignore[union-attr]
    assert stop_s < 15  # did not wait for the full grace period
    assert statuses[:2] == [health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING]
    rows = ledger_rows(cfg.db)
    assert [r["request_id"] for r in rows] == ["last-one"]
    assert not (tmp_path / "ledger.db-wal").exists() or (tmp_path / "ledger.db-wal").stat().st_size == 0
    with pytest.raises(grpc.RpcError) as err:
        teacher.Infer(image_request(random_images(1, 1)), metadata=auth(key), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    channel.close()


def test_only_the_last_of_the_overlapping_grpc_stops_cuts_calls(tmp_path) -> None:
    """Shutdown overlaps two gRPC stops: one that refuses new calls, one that cuts what is left once the service's
    calls end. A first stop with a finite grace crashed grpcio (a segfault, seen on Python 3.13) when its grace ran out
    just as the second stop freed the server, so the first never cuts and the second cuts at once (float32, CPU)."""
    srv = RunningServer(settings(tmp_path), model=tiny_vit())
    grpc_server = srv.server._server
    assert grpc_server is not None
    graces: list[float | None] = []
    stop = grpc_server.stop

    async def recorded_stop(grace: float | None) -> None:
        graces.append(grace)
        await stop(grace)

    grpc_server.stop = recorded_stop  # type: ignore[method-assign]
    srv.stop(grace=5.0)  # idle: the cutting stop starts first
    assert len(graces) == 2 and graces.count(None) == 1
    assert all(grace is None or grace > 1e6 for grace in graces)  # the other never runs out while the server lives


def test_the_dashboard_starts_beside_the_server_when_asked(tmp_path) -> None:
    with running_server(settings(tmp_path, dashboard_port=0), model=tiny_vit()) as srv:
        assert srv.dashboard_url is not None
        assert urllib.request.urlopen(f"{srv.dashboard_url}/healthz", timeout=10).status == 200
    with pytest.raises(OSError):  # stopped with the server
        urllib.request.urlopen(f"{srv.dashboard_url}/healthz", timeout=2)


def test_settings_come_from_the_environment_and_flags_win(monkeypatch) -> None:
    from teacher_server.settings import ServerSettings

    monkeypatch.setenv("MASKEDKD_DB", "sqlite:///from-env.db")
    monkeypatch.setenv("MASKEDKD_MODEL_KWARGS", '{"img_size": 32}')
    monkeypatch.setenv("MASKEDKD_MAX_DELAY_MS", "7.5")
    s = ServerSettings(model="vit_tiny_patch16_224", max_delay_ms=1.0)
    assert (s.db, s.model_kwargs, s.max_delay_ms, s.port, s.host) == (
        "sqlite:///from-env.db",
        {"img_size": 32},
        1.0,
        50051,
        "127.0.0.1",
    )
    with pytest.raises(ValueError, match="dtype"):
        ServerSettings(dtype="float64")


@pytest.mark.parametrize("age_s", [None, 1.0])
def test_max_connection_age_ends_idle_connections_so_clients_re_resolve(tmp_path: Path, age_s: float | None) -> None:
    states: list[grpc.ChannelConnectivity] = []
    left_ready = threading.Event()

    def seen(state: grpc.ChannelConnectivity) -> None:
        if states and states[-1] == grpc.ChannelConnectivity.READY and state != state.READY:
            left_ready.set()
        states.append(state)

    with running_server(settings(tmp_path, max_connection_age_s=age_s, grace_s=0.5)) as srv:
        channel = grpc.insecure_channel(srv.address)
        channel.subscribe(seen)
        pb_grpc.TeacherServiceStub(channel).GetModelInfo(pb.ModelInfoRequest(), timeout=30)
        ended = left_ready.wait(timeout=6.0)  # GOAWAY after the age (+ jitter) and the grace
        channel.unsubscribe(seen)
        channel.close()
    assert ended == (age_s is not None), states
