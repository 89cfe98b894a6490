"""What the dashboard API tests share: the tokens' headers, the ledger read back with raw SQL (sqlite3), and a
key's numbers in an answer checked against those sums."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from seed_ledger import ADMIN_TOKEN, VIEWER_TOKEN

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


def assert_key_numbers(api_key: dict[str, Any], expected: tuple[Any, ...]) -> None:
    requests, images, tokens, gflops, full, cost = expected
    assert (api_key["requests"], api_key["images"], api_key["tokens"]) == (requests, images, tokens)
    assert api_key["gflops"] == pytest.approx(gflops, rel=REL)
    assert api_key["full_gflops"] == pytest.approx(full, rel=REL)
    assert api_key["saved_gflops"] == pytest.approx(full - gflops, rel=REL, abs=1e-9)
    assert api_key["cost"] == pytest.approx(cost, rel=REL)
    assert api_key["saving_pct"] == pytest.approx(100 * (1 - gflops / full) if full else 0.0, rel=REL, abs=1e-9)
