"""Alembic migrations: a ledger written by main before migrations existed (tests/teacher_server/data, 2 keys and 6
usage rows, logits inside `usage`) is upgraded in place at start and by `teacher-server ledger upgrade`; its rows,
totals and replays survive, and billing goes on. The migrated schema equals the models (autogenerate finds nothing)."""

from __future__ import annotations

import logging
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from dtype_marks import child_env
from postgres_testkit import pg_rows, postgres_server, postgres_url  # noqa: F401 (fixtures)
from service_testkit import auth, image_request, logits_of, random_images, random_keep, settings, stub, tiny_vit

from teacher_server.ledger import database, models
from teacher_server.ledger.migrate import alembic_config, head_revision
from teacher_server.testing.server import running_server

pytestmark = [pytest.mark.dtype("none"), pytest.mark.timeout(180)]

PRE_ALEMBIC = Path(__file__).parent / "data" / "ledger-pre-alembic.db"
CLI = [sys.executable, "-m", "teacher_server.cli"]


def rows(db: Path, query: str) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(query).fetchall()


def test_a_ledger_of_main_before_migrations_upgrades_in_place_and_keeps_billing(tmp_path, caplog) -> None:
    db = tmp_path / "ledger.db"
    shutil.copy(PRE_ALEMBIC, db)
    before_usage = rows(
        db,
        "SELECT id, api_key_id, request_id, images, tokens, gflops, full_gflops, cost, created_at "
        "FROM usage ORDER BY id",
    )
    before_logits = dict(rows(db, "SELECT id, logits FROM usage WHERE logits IS NOT NULL"))
    before_keys = rows(db, "SELECT id, name, key_hash, quota_gflops, price_per_gflop FROM api_keys ORDER BY id")
    assert len(before_usage) == 6 and len(before_logits) == 5
    with caplog.at_level(logging.INFO, logger="teacher_server.ledger.migrate"):
        sessions = database.open_ledger(f"sqlite:///{db}")
    assert [r.getMessage() for r in caplog.records if r.name == "teacher_server.ledger.migrate"] == [
        f"ledger: upgraded schema from 0001 to {head_revision()}"
    ]
    assert rows(db, "SELECT version_num FROM alembic_version") == [(head_revision(),)]
    assert (
        rows(
            db,
            "SELECT id, api_key_id, request_id, images, tokens, gflops, full_gflops, cost, created_at "
            "FROM usage ORDER BY id",
        )
        == before_usage
    )
    assert rows(db, "SELECT id, name, key_hash, quota_gflops, price_per_gflop FROM api_keys ORDER BY id") == before_keys
    assert dict(rows(db, "SELECT usage_id, logits FROM replay_payloads")) == before_logits
    assert "logits" not in {r[1] for r in rows(db, "PRAGMA table_info(usage)")}  # billing rows keep no logits
    # revision 0003: the price in force, recovered from each row (the fixture's bob has price 0.5 now, but his rows
    # were billed at the 1e-6 default: cost / gflops, not his current price); the currency was never recorded
    key_price = dict(rows(db, "SELECT id, price_per_gflop FROM api_keys"))
    assert rows(db, "SELECT id, price_per_gflop, currency FROM usage ORDER BY id") == [
        (rid, pytest.approx(1e-6, rel=1e-12), None) for rid, *_ in before_usage
    ]
    assert all(
        cost != gflops * key_price[kid]
        for _, kid, _, _, _, gflops, _, cost, _ in before_usage
        if key_price[kid] is not None
    )
    totals = rows(db, "SELECT api_key_id, COUNT(*), SUM(images), SUM(tokens), SUM(gflops) FROM usage GROUP BY 1")
    assert rows(db, "SELECT api_key_id, requests, images, tokens, gflops FROM key_counters ORDER BY 1") == totals
    with sessions.kw["bind"].connect() as conn:  # the migrated schema is exactly what the models declare
        assert compare_metadata(MigrationContext.configure(conn), models.Base.metadata) == []
    sessions.kw["bind"].dispose()

    legacy_logits = torch.frombuffer(bytearray(before_logits[1]), dtype=torch.float32).reshape(2, 10)
    with running_server(settings(tmp_path, db=f"sqlite:///{db}"), model=tiny_vit(seed=3)) as srv:
        channel, teacher = stub(srv.address)
        alice = auth("mkd_alice-secret")  # the fixture's keys were made with these secrets
        replay = teacher.Infer(image_request(random_images(2, 0), request_id="legacy-0"), metadata=alice)
        assert replay.usage.replayed and torch.equal(logits_of(replay), legacy_logits)
        fresh = teacher.Infer(
            image_request(random_images(1, 1), random_keep(1, 16, 1), request_id="new-1"), metadata=alice
        )
        assert not fresh.usage.replayed
        channel.close()
    assert rows(db, "SELECT COUNT(*) FROM usage") == [(7,)]
    assert rows(db, "SELECT price_per_gflop, currency, cost FROM usage WHERE request_id = 'new-1'") == [
        (srv.settings.price_per_gflop, srv.settings.currency, pytest.approx(fresh.usage.cost, rel=1e-12))
    ]
    assert rows(db, "SELECT requests, gflops FROM key_counters WHERE api_key_id = 1") == [
        (4, pytest.approx(totals[0][4] + fresh.usage.gflops, rel=1e-12))
    ]


def test_cli_ledger_upgrade_migrates_once_and_then_says_it_is_current(tmp_path) -> None:
    db = tmp_path / "ledger.db"
    shutil.copy(PRE_ALEMBIC, db)
    env = child_env()

    def upgrade() -> subprocess.CompletedProcess[str]:  # no alembic.ini in the working directory
        argv = [*CLI, "ledger", "upgrade", "--db", f"sqlite:///{db}"]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)

    first = upgrade()
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == f"ledger sqlite:///{db}: upgraded schema from 0001 to {head_revision()}"
    again = upgrade()
    assert again.returncode == 0 and "is at the newest schema" in again.stdout
    assert rows(db, "SELECT COUNT(*) FROM usage") == [(6,)]


def test_a_postgres_ledger_of_main_before_migrations_upgrades_in_place(postgres_url: str) -> None:
    from alembic import command
    from sqlalchemy import text

    engine = database.make_engine(postgres_url)
    with engine.begin() as conn:  # main's schema as create_all made it (revision 0001), without alembic_version
        command.upgrade(alembic_config(conn), "0001")
        conn.execute(text("DROP TABLE alembic_version"))
        conn.execute(
            text(
                "INSERT INTO api_keys (name, key_prefix, key_hash, created_at, disabled) "
                "VALUES ('pg', 'mkd_pg', :h, now(), false)"
            ),
            {"h": "p" * 64},
        )
        conn.execute(
            text(
                "INSERT INTO usage (api_key_id, request_id, model, images, tokens, gflops, full_gflops, "
                "cost, latency_ms, queue_ms, batch_images, created_at, logits, logits_shape) "
                "VALUES (1, 'r1', 'm', 1, 5, 2.5, 4.0, 0.1, 1, 1, 1, now(), :l, '1,1')"
            ),
            {"l": b"\x00\x00\x80\x3f"},
        )
    engine.dispose()
    sessions = database.open_ledger(postgres_url)
    with sessions.kw["bind"].connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), models.Base.metadata) == []
    sessions.kw["bind"].dispose()
    assert pg_rows(postgres_url, "SELECT version_num FROM alembic_version") == [(head_revision(),)]
    assert pg_rows(postgres_url, "SELECT request_id, gflops FROM usage") == [("r1", 2.5)]
    assert pg_rows(postgres_url, "SELECT price_per_gflop, currency FROM usage") == [(pytest.approx(0.04), None)]
    assert [(u, bytes(b)) for u, b in pg_rows(postgres_url, "SELECT usage_id, logits FROM replay_payloads")] == [
        (1, b"\x00\x00\x80\x3f")
    ]
    assert pg_rows(postgres_url, "SELECT requests, gflops, window_gflops FROM key_counters") == [(1, 2.5, 2.5)]


def test_processes_upgrading_one_sqlite_ledger_together_migrate_it_once(tmp_path) -> None:
    db = tmp_path / "ledger.db"
    shutil.copy(PRE_ALEMBIC, db)
    env = child_env()
    procs = [
        subprocess.Popen(
            [*CLI, "ledger", "upgrade", "--db", f"sqlite:///{db}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err for _, err in outs]
    assert sum("upgraded schema from 0001" in out for out, _ in outs) == 1
    assert sum("is at the newest schema" in out for out, _ in outs) == 3
    assert rows(db, "SELECT COUNT(*) FROM replay_payloads") == [(5,)]  # moved once, not once per process


def test_a_failing_migration_leaves_the_ledger_as_it_was(tmp_path) -> None:
    db = tmp_path / "ledger.db"
    shutil.copy(PRE_ALEMBIC, db)
    with sqlite3.connect(db) as conn:  # a table in the way of revision 0002, after its first steps ran
        conn.execute("CREATE TABLE replay_payloads (unrelated INTEGER)")
    with pytest.raises(Exception, match="replay_payloads"):
        database.open_ledger(f"sqlite:///{db}")
    assert [r[1] for r in rows(db, "PRAGMA table_info(api_keys)")] == [
        "id",
        "name",
        "key_prefix",
        "key_hash",
        "created_at",
        "disabled",
        "quota_gflops",
        "price_per_gflop",
    ]
    assert "logits" in {r[1] for r in rows(db, "PRAGMA table_info(usage)")}
    assert sorted(r[0] for r in rows(db, "SELECT name FROM sqlite_master WHERE type = 'table'")) == [
        "api_keys",
        "replay_payloads",
        "usage",
    ]  # no alembic_version: the next start tries again from 0001


def test_revision_0001_is_the_schema_main_created(tmp_path) -> None:
    """The tables, columns, types, keys and indexes of revision 0001 equal those of the ledger main wrote."""
    from alembic import command

    engine = database.make_engine(f"sqlite:///{tmp_path / 'r1.db'}")
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0001")
    engine.dispose()

    def schema(db: Path) -> dict[str, object]:
        out: dict[str, object] = {}
        for (table,) in rows(
            db, "SELECT name FROM sqlite_master WHERE type = 'table' AND name != 'alembic_version' ORDER BY name"
        ):
            indexes = rows(db, f"PRAGMA index_list({table})")
            out[table] = (
                rows(db, f"PRAGMA table_info({table})"),
                rows(db, f"PRAGMA foreign_key_list({table})"),
                sorted((i[2], i[3], tuple(c[2] for c in rows(db, f"PRAGMA index_info('{i[1]}')"))) for i in indexes),
            )
        return out

    assert schema(tmp_path / "r1.db") == schema(PRE_ALEMBIC)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_revision_0004_reads_rows_billed_before_it_as_training_targets(tmp_path, request, backend: str) -> None:
    """A ledger at 0003 with rows (two keys, a currency and a NULL one) upgrades to 0004: every old row reads back
    with purpose '' and is otherwise unchanged, a row inserted without a purpose gets '', the schema equals the
    models."""
    from alembic import command
    from sqlalchemy import text

    url = f"sqlite:///{tmp_path / 'r3.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    engine = database.make_engine(url)
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0003")
        for name in ("a", "b"):
            conn.execute(
                text(
                    "INSERT INTO api_keys (name, key_prefix, key_hash, created_at, disabled) "
                    "VALUES (:n, 'mkd_x', :h, CURRENT_TIMESTAMP, false)"
                ),
                {"n": name, "h": name * 64},
            )
        for i, (key_id, currency) in enumerate([(1, "USD"), (1, None), (2, "EUR")]):
            conn.execute(
                text(
                    "INSERT INTO usage (api_key_id, request_id, model, images, tokens, gflops, full_gflops, "
                    "cost, price_per_gflop, currency, latency_ms, queue_ms, batch_images, created_at) "
                    "VALUES (:k, :r, 'm', 2, 10, :g, 4.0, :c, 1e-6, :cur, 1, 1, 2, CURRENT_TIMESTAMP)"
                ),
                {"k": key_id, "r": f"old-{i}", "g": 1.5 + i, "c": (1.5 + i) * 1e-6, "cur": currency},
            )
    query = "SELECT request_id, api_key_id, gflops, cost, price_per_gflop, currency FROM usage ORDER BY id"
    with engine.connect() as conn:
        before = [tuple(r) for r in conn.execute(text(query))]
    engine.dispose()

    sessions = database.open_ledger(url)
    engine = sessions.kw["bind"]
    with engine.begin() as conn:
        assert compare_metadata(MigrationContext.configure(conn), models.Base.metadata) == []
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == head_revision()
        assert [tuple(r) for r in conn.execute(text(query))] == before
        assert [tuple(r) for r in conn.execute(text("SELECT request_id, purpose FROM usage ORDER BY id"))] == [
            ("old-0", ""),
            ("old-1", ""),
            ("old-2", ""),
        ]
        conn.execute(
            text(
                "INSERT INTO usage (api_key_id, request_id, model, images, tokens, gflops, full_gflops, "
                "cost, latency_ms, queue_ms, batch_images, created_at) "
                "VALUES (2, 'raw', 'm', 1, 5, 1.0, 2.0, 0.0, 1, 1, 1, CURRENT_TIMESTAMP)"
            )
        )
        assert conn.execute(text("SELECT purpose FROM usage WHERE request_id = 'raw'")).scalar() == ""
    engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_revision_0005_gives_existing_keys_an_equal_share_and_keeps_every_replay(
    tmp_path, request, backend: str
) -> None:
    """A ledger at 0004 with keys, rows and replay payloads upgrades to 0005: every key gets weight 1 and priority
    'standard', a key inserted without them too, and no usage row or replay payload is lost (a table rebuild on
    SQLite would cascade into replay_payloads)."""
    from alembic import command
    from sqlalchemy import text

    url = f"sqlite:///{tmp_path / 'r4.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    engine = database.make_engine(url)
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0004")
        conn.execute(
            text(
                "INSERT INTO api_keys (name, key_prefix, key_hash, created_at, disabled) "
                "VALUES ('a', 'mkd_x', :h, CURRENT_TIMESTAMP, false)"
            ),
            {"h": "a" * 64},
        )
        conn.execute(
            text(
                "INSERT INTO usage (api_key_id, request_id, model, images, tokens, gflops, full_gflops, cost, "
                "latency_ms, queue_ms, batch_images, created_at, content_digest) "
                "VALUES (1, 'old', 'm', 1, 5, 1.0, 2.0, 0.0, 1, 1, 1, CURRENT_TIMESTAMP, :d)"
            ),
            {"d": "f" * 64},
        )
        conn.execute(
            text(
                "INSERT INTO replay_payloads (usage_id, logits, logits_shape, expires_at) "
                "VALUES (1, :b, '1,1', CURRENT_TIMESTAMP)"
            ),
            {"b": b"\x00\x00\x80\x3f"},
        )
    engine.dispose()
    sessions = database.open_ledger(url)
    engine = sessions.kw["bind"]
    with engine.begin() as conn:
        assert compare_metadata(MigrationContext.configure(conn), models.Base.metadata) == []
        assert [tuple(r) for r in conn.execute(text("SELECT name, weight, priority FROM api_keys"))] == [
            ("a", 1.0, "standard")
        ]
        conn.execute(
            text(
                "INSERT INTO api_keys (name, key_prefix, key_hash, created_at, disabled) "
                "VALUES ('b', 'mkd_y', :h, CURRENT_TIMESTAMP, false)"
            ),
            {"h": "b" * 64},
        )
        assert conn.execute(text("SELECT weight, priority FROM api_keys WHERE name = 'b'")).one() == (1.0, "standard")
        assert [tuple(r) for r in conn.execute(text("SELECT request_id, content_digest FROM usage"))] == [
            ("old", "f" * 64)
        ]
        assert conn.execute(text("SELECT COUNT(*) FROM replay_payloads")).scalar() == 1
    engine.dispose()
