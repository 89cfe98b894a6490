"""Transient ledger failures answer UNAVAILABLE "ledger unavailable, not billed, retry" and bill nothing; a retry
under the same request_id, once the ledger is back, is billed exactly once. SQLite: another connection holds the
write lock beyond the (short) busy timeout; the file is full (SQLite's page limit). Postgres: the server is stopped and
started again."""

from __future__ import annotations

import sqlite3

import grpc
import pytest
from postgres_testkit import pg_rows, postgres_server, postgres_url  # noqa: F401 (fixtures)
from service_testkit import auth, image_request, model_fixture, random_images, random_keep, settings, stub

from maskedkd.v1 import teacher_pb2 as pb
from teacher_server.testing.server import running_server

pytestmark = [pytest.mark.dtype("float32"), pytest.mark.timeout(180)]
MESSAGE = "ledger unavailable, not billed, retry"


model = model_fixture(seed=11)


def test_sqlite_write_lock_held_too_long_is_unavailable_and_a_retry_bills_once(tmp_path, model) -> None:
    with running_server(settings(tmp_path, ledger_busy_timeout_s=0.3), model=model) as srv:
        plain, limited = srv.create_key("plain"), srv.create_key("limited", quota_gflops=1e9)
        channel, teacher = stub(srv.address)
        db = srv.settings.db.removeprefix("sqlite:///")
        requests = {
            secret: image_request(random_images(2, i), random_keep(2, 12, i), request_id=f"locked-{i}")
            for i, secret in enumerate((plain, limited))
        }
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # the write lock, held by someone else
        try:
            for secret, request in requests.items():
                with pytest.raises(grpc.RpcError) as err:
                    teacher.Infer(request, metadata=auth(secret))
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                assert err.value.details().startswith(MESSAGE) and len(err.value.details()) < 300
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT COUNT(*) FROM usage").fetchone() == (0,)  # nothing billed
        for secret, request in requests.items():  # the client's retry, same id
            assert not teacher.Infer(request, metadata=auth(secret)).usage.replayed
            assert teacher.Infer(request, metadata=auth(secret)).usage.replayed
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT request_id FROM usage ORDER BY request_id").fetchall() == [
                ("locked-0",),
                ("locked-1",),
            ]
            assert conn.execute("SELECT COUNT(*) FROM quota_holds").fetchone() == (0,)
        channel.close()


def test_sqlite_full_is_unavailable_and_a_retry_bills_once(tmp_path, model) -> None:
    """SQLITE_FULL ("database or disk is full") through SQLite's own limit on the file's pages."""
    from sqlalchemy import event

    with running_server(settings(tmp_path), model=model) as srv:
        secret = srv.create_key("full")
        channel, teacher = stub(srv.address)
        engine = srv.server.sessions.kw["bind"]
        db = srv.settings.db.removeprefix("sqlite:///")
        with sqlite3.connect(db) as conn:
            pages = conn.execute("PRAGMA page_count").fetchone()[0]

        def no_room(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            dbapi_conn.execute(f"PRAGMA max_page_count = {pages}")

        event.listen(engine, "connect", no_room)
        engine.dispose()  # new connections, each with the limit
        refused: tuple[pb.InferRequest, grpc.RpcError] | None = None
        try:
            for i in range(40):  # until the file would have to grow (each answer keeps 64 x 40 bytes of logits)
                request = image_request(random_images(64, i), random_keep(64, 64, i), request_id=f"f{i}")
                try:
                    teacher.Infer(request, metadata=auth(secret))
                except grpc.RpcError as err:
                    refused = (request, err)
                    break
        finally:
            event.remove(engine, "connect", no_room)
            engine.dispose()
        assert refused is not None, "the page limit never filled up"
        request, err = refused
        assert err.code() == grpc.StatusCode.UNAVAILABLE and err.details().startswith(MESSAGE), err.details()
        assert "full" in err.details()
        count = "SELECT COUNT(*) FROM usage WHERE request_id = ?"
        with sqlite3.connect(db) as conn:
            assert conn.execute(count, (request.request_id,)).fetchone() == (0,)  # nothing billed
        assert not teacher.Infer(request, metadata=auth(secret)).usage.replayed  # room again: billed now, once
        assert teacher.Infer(request, metadata=auth(secret)).usage.replayed
        with sqlite3.connect(db) as conn:
            assert conn.execute(count, (request.request_id,)).fetchone() == (1,)
        channel.close()


def test_postgres_restart_is_unavailable_then_billed_once(postgres_server, postgres_url: str, model) -> None:
    from test_ledger_postgres import pg_settings

    with running_server(pg_settings(postgres_url), model=model) as srv:
        secret = srv.create_key("pg")
        channel, teacher = stub(srv.address)
        before = image_request(random_images(1, 1), random_keep(1, 10, 1), request_id="before")
        teacher.Infer(before, metadata=auth(secret))  # the pool holds live connections now
        request = image_request(random_images(1, 2), random_keep(1, 10, 2), request_id="during")
        # A clean shutdown: the testkit's own stop is immediate, and with its synchronous_commit=off that would lose
        # the last commits (an artifact of the throw-away server's settings, not of the ledger).
        postgres_server.stop("fast", check=True)
        try:
            with pytest.raises(grpc.RpcError) as err:
                teacher.Infer(request, metadata=auth(secret))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and err.value.details().startswith(MESSAGE)
        finally:
            postgres_server.start()
        assert not teacher.Infer(request, metadata=auth(secret)).usage.replayed
        assert teacher.Infer(request, metadata=auth(secret)).usage.replayed
        assert pg_rows(postgres_url, "SELECT request_id FROM usage ORDER BY id") == [("before",), ("during",)]
        channel.close()
