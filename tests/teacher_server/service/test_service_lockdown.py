"""Lock-down of the teacher server over real gRPC: the key is checked before a request message is read, failed key
checks are rate-limited (per peer address and overall) without ledger queries once the bucket is empty, key names on
/metrics only when enabled, tokens never from the command line."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from service_testkit import auth, image_request, ledger_rows, random_images, random_keep, serve_cli, settings, stub
from sqlalchemy import event

from maskedkd.v1 import teacher_pb2 as pb
from teacher_server.errors import AuthenticationError
from teacher_server.ledger import database, keys
from teacher_server.metrics import ServerMetrics
from teacher_server.service.accounting.auth import KeyAuthenticator
from teacher_server.service.auth_guard import AuthFirstInterceptor, FailedAuthLimiter, peer_host
from teacher_server.settings import ServerSettings
from teacher_server.testing.server import RunningServer, running_server

pytestmark = [pytest.mark.dtype("float32"), pytest.mark.timeout(180)]


def _guess() -> str:
    return "mkd_" + secrets.token_urlsafe(32)


class LedgerQueries:
    """Counts the SQL statements that read the api_keys table on the server's engine."""

    def __init__(self, srv: RunningServer) -> None:
        self.count = 0
        self._engine = srv.server.sessions.kw["bind"]
        event.listen(self._engine, "before_cursor_execute", self._seen)

    def _seen(self, _conn, _cursor, statement: str, *_args) -> None:  # type: ignore[no-untyped-def]
        if "api_keys" in statement:
            self.count += 1

    def close(self) -> None:
        event.remove(self._engine, "before_cursor_execute", self._seen)


def _code_and_details(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        call(*args, **kwargs)
    return err.value.code(), err.value.details()


@pytest.fixture()
def limited(tmp_path: Path) -> Iterator[RunningServer]:
    cfg = settings(tmp_path, metrics_port=0, auth_failures_per_s=0.25, auth_failures_burst=5, max_message_mb=1.0)
    with running_server(cfg) as srv:
        yield srv


def test_failed_key_checks_are_rate_limited_without_ledger_queries(limited: RunningServer) -> None:
    srv = limited
    good = srv.create_key("good")
    fresh = srv.create_key("fresh")  # valid, but never used before the lock-out
    channel, teacher = stub(srv.address)
    request = image_request(random_images(1, 1), random_keep(1, 8, 1))
    assert teacher.Infer(request, metadata=auth(good)).usage.images == 1
    queries = LedgerQueries(srv)
    try:
        # 20 guesses at once: the burst of 5 is looked up (a token is reserved before each lookup), the rest are
        # refused at once without a ledger query
        calls = [teacher.Infer.future(request, metadata=auth(_guess())) for _ in range(20)]
        answers = [(c.exception().code(), c.exception().details()) for c in calls]  # type: ignore[union-attr]
        assert {code for code, _ in answers} == {grpc.StatusCode.UNAUTHENTICATED}
        assert sum(details == "unknown API key" for _, details in answers) == 5
        assert sum("too many failed API key checks from 127.0.0.1" in details for _, details in answers) == 15
        assert queries.count == 5
        for _ in range(5):  # the bucket stays empty
            code, details = _code_and_details(teacher.Infer, request, metadata=auth(_guess()))
            assert code == grpc.StatusCode.UNAUTHENTICATED and "too many failed" in details
        code, details = _code_and_details(teacher.GetModelInfo, pb.ModelInfoRequest(), metadata=auth(_guess()))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "too many failed" in details
        code, details = _code_and_details(teacher.Infer, request, metadata=auth(fresh))  # the price of a lock-out
        assert "too many failed" in details
        assert queries.count == 5
        # a key that passed before is served during the lock-out, from the cache
        assert teacher.Infer(request, metadata=auth(good)).usage.images == 1
        assert teacher.GetModelInfo(pb.ModelInfoRequest()).num_classes == 10  # no key: anonymous info still works
        time.sleep(4.2)  # 0.25 checks per second: one more check is allowed
        assert teacher.Infer(request, metadata=auth(fresh)).usage.images == 1
    finally:
        queries.close()
        channel.close()
    billed = [r["key"] for r in ledger_rows(srv.settings.db)]
    assert billed == ["good", "good", "fresh"]  # nothing refused was billed
    assert srv.metrics_url is not None
    text = urllib.request.urlopen(srv.metrics_url, timeout=10).read().decode()
    assert 'maskedkd_requests_total{code="UNAUTHENTICATED",key="-",model=""} 26.0' in text  # 20 + 5 + fresh


def test_a_burst_of_first_calls_with_one_new_key_is_one_check(limited: RunningServer) -> None:
    """16 calls at once with a key the server has not seen, burst 5: the calls that arrive while its first check is
    under way wait for that check, so none is refused as a guess and the ledger is asked once (each call reserving
    its own token refused the 6th on: a training run's workers starting together)."""
    srv = limited
    fresh = srv.create_key("many-workers")
    channel, teacher = stub(srv.address)
    queries = LedgerQueries(srv)
    try:
        calls = [teacher.GetModelInfo.future(pb.ModelInfoRequest(), metadata=auth(fresh)) for _ in range(16)]
        assert [c.result(timeout=30).num_classes for c in calls] == [10] * 16
        assert queries.count == 1
        for _ in range(4):  # the failure bucket is untouched: a burst of 5 guesses is still looked up
            code, details = _code_and_details(teacher.GetModelInfo, pb.ModelInfoRequest(), metadata=auth(_guess()))
            assert (code, details) == (grpc.StatusCode.UNAUTHENTICATED, "unknown API key")
    finally:
        queries.close()
        channel.close()


def test_concurrent_checks_of_one_key_share_one_lookup_and_one_token(tmp_path: Path) -> None:
    """The guard itself on a real SQLite ledger, 30 checks started together in one event loop (each reaches its
    ledger lookup before any lookup returns): a valid key passes 30 times on one query; one wrong key is refused 30
    times on one query and one token; a check whose lookup failed (cancelled) leaves the next to check anew."""
    sessions = database.open_ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    secret, _ = keys.create_api_key(sessions, name="k")
    limiter = FailedAuthLimiter(per_peer_per_s=1e-3, per_peer_burst=5, global_per_s=1e-3, global_burst=50)
    guard = AuthFirstInterceptor(KeyAuthenticator(sessions), limiter, ServerMetrics())
    loads = 0
    engine = sessions.kw["bind"]

    def seen(_conn, _cursor, statement: str, *_args) -> None:  # type: ignore[no-untyped-def]
        nonlocal loads
        loads += "api_keys" in statement

    event.listen(engine, "before_cursor_execute", seen)
    peer = "ipv4:127.0.0.1:4242"

    async def checks(secret_: str) -> list[object]:
        metadata = (("authorization", f"Bearer {secret_}"),)
        return await asyncio.gather(*(guard.check(metadata, peer) for _ in range(30)), return_exceptions=True)

    async def cancelled_then_checked(secret_: str) -> object:
        metadata = (("authorization", f"Bearer {secret_}"),)
        first = asyncio.ensure_future(guard.check(metadata, peer))
        waiter = asyncio.ensure_future(guard.check(metadata, peer))
        await asyncio.sleep(0)  # both started: the first holds the lookup, the second waits for it
        first.cancel()
        return await waiter

    try:
        answers = asyncio.run(checks(secret))
        assert [getattr(a, "name", a) for a in answers] == ["k"] * 30 and loads == 1
        wrong = "mkd_" + secrets.token_urlsafe(32)
        answers = asyncio.run(checks(wrong))
        assert all(isinstance(a, AuthenticationError) and str(a) == "unknown API key" for a in answers)
        assert loads == 2 and limiter.wait_s("127.0.0.1") == 0  # 4 of the 5 tokens left
        other, _ = keys.create_api_key(sessions, name="other")
        before = loads
        assert asyncio.run(cancelled_then_checked(other)).name == "other"  # type: ignore[attr-defined]
        assert loads - before == 2  # the cancelled call's lookup (its thread runs on), then the waiter's own
        for _ in range(4):
            assert limiter.take("127.0.0.1") == 0
        assert limiter.take("127.0.0.1") > 0
    finally:
        event.remove(engine, "before_cursor_execute", seen)
        engine.dispose()


def test_the_key_is_checked_before_the_message_is_read(limited: RunningServer) -> None:
    """The server's message limit is 1 MiB here: a 4 MiB message is refused for its key (UNAUTHENTICATED), which
    only happens when the key is looked at before the message is received; with a valid key the same message meets
    the size limit."""
    srv = limited
    big = image_request(torch.zeros(128, 3, 128, 128, dtype=torch.uint8))  # ~6 MiB of pixels
    assert big.ByteSize() > 4 * 1024 * 1024
    channel, teacher = stub(srv.address)
    try:
        code, details = _code_and_details(teacher.Infer, big, timeout=30)
        assert code == grpc.StatusCode.UNAUTHENTICATED and "missing API key" in details
        code, _ = _code_and_details(lambda: list(teacher.InferStream(iter([big, big]), timeout=30)))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        code, details = _code_and_details(teacher.Infer, big, metadata=auth(srv.create_key("sized")), timeout=30)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    finally:
        channel.close()
    assert ledger_rows(srv.settings.db) == []


def test_limiter_buckets_are_per_peer_and_global() -> None:
    limiter = FailedAuthLimiter(per_peer_per_s=1e-3, per_peer_burst=3, global_per_s=1e-3, global_burst=5)
    for _ in range(10):  # a check that succeeds gives its reserved token back
        assert limiter.take("10.0.0.1") == 0
        limiter.refund("10.0.0.1")
    for _ in range(3):
        assert limiter.take("10.0.0.1") == 0  # reserved before the lookup, kept when the key was wrong
    assert limiter.wait_s("10.0.0.1") > 100  # this peer waits ...
    assert limiter.wait_s("10.0.0.2") == 0  # ... another one does not
    limiter.record_failure("10.0.0.2")
    limiter.record_failure("10.0.0.3")
    assert limiter.wait_s("10.0.0.4") > 100  # all peers together used the global burst
    assert [peer_host(p) for p in ("ipv4:127.0.0.1:5555", "ipv6:[::1]:80", "unix:/tmp/s")] == [
        "127.0.0.1",
        "::1",
        "unix:/tmp/s",
    ]


def test_key_names_on_metrics_only_when_enabled(tmp_path: Path) -> None:
    for enabled in (False, True):
        cfg = settings(tmp_path / str(enabled), metrics_port=0, metrics_key_labels=enabled)
        with running_server(cfg) as srv:
            channel, teacher = stub(srv.address)
            teacher.Infer(
                image_request(random_images(1, 2), random_keep(1, 8, 2)),
                metadata=auth(srv.create_key("customer-alice")),
            )
            channel.close()
            assert srv.metrics_url is not None
            text = urllib.request.urlopen(srv.metrics_url, timeout=10).read().decode()
        key = "customer-alice" if enabled else "-"
        assert f'maskedkd_images_total{{key="{key}",model="vit_tiny_patch16_224"}} 1.0' in text
        assert ("customer-alice" in text) == enabled


@pytest.mark.parametrize(
    "argv,env",
    [
        (["serve", "--model", "vit_tiny_patch16_224", "--admin-token"], "MASKEDKD_ADMIN_TOKEN"),
        (["serve", "--model", "vit_tiny_patch16_224", "--viewer-token"], "MASKEDKD_VIEWER_TOKEN"),
        (["dashboard", "--admin-token"], "MASKEDKD_ADMIN_TOKEN"),
    ],
)
def test_tokens_on_the_command_line_are_refused(tmp_path: Path, argv: list[str], env: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "teacher_server.cli", *argv, "s3cret-value", "--db", f"sqlite:///{tmp_path / 'l.db'}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    flag = argv[-1]
    assert len(lines) == 1 and env in lines[0] and f"{flag}-file FILE" in lines[0], result.stderr
    assert "s3cret-value" not in result.stderr and not (tmp_path / "l.db").exists()


def test_tokens_come_from_the_environment_or_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "admin").write_text("admin-from-file\n")
    (tmp_path / "viewer").write_text("  viewer-from-file ")
    monkeypatch.setenv("MASKEDKD_VIEWER_TOKEN_FILE", str(tmp_path / "viewer"))
    s = ServerSettings(admin_token_file=str(tmp_path / "admin"))
    assert (s.admin_token, s.viewer_token) == ("admin-from-file", "viewer-from-file")
    monkeypatch.delenv("MASKEDKD_VIEWER_TOKEN_FILE")
    monkeypatch.setenv("MASKEDKD_ADMIN_TOKEN", "admin-from-env")
    assert ServerSettings().admin_token == "admin-from-env"
    result = serve_cli("--admin-token-file", str(tmp_path / "missing"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "cannot read admin_token_file" in result.stderr and "missing" in result.stderr
