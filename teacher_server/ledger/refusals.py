"""Refused calls, counted per UTC day, key and reason in the ledger's `refusals` table (nothing refused is billed).

The hot path only adds 1 to an in-memory counter (a dict under a lock); the server writes the counts to the ledger
every FLUSH_INTERVAL_S and at shutdown, one upsert per (day, key, reason) cell, so an auth flood costs one row
update per second, not one per call. Counts not written yet when a process dies are lost (at most one interval);
a failed write keeps them for the next one.

Reasons: `auth` (missing, wrong or disabled key, or too many failed key checks), `quota` (quota window spent),
`rate_limit` (GFLOPs per minute reached), `invalid` (bad input: INVALID_ARGUMENT, an unknown model, a request_id
reused for other inputs).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

from sqlalchemy import Table
from sqlalchemy.orm import Session, sessionmaker

from teacher_server.errors import (
    AuthenticationError,
    InvalidRequestError,
    ModelNotFoundError,
    PermissionDeniedError,
    RefusalWithDetailsError,
    RequestIdReusedError,
)
from teacher_server.ledger.models import Refusal

REASONS = ("auth", "quota", "rate_limit", "invalid", "overload", "deadline")
NO_KEY = 0  # api_key_id of refusals made before a key was known
FLUSH_INTERVAL_S = 1.0
DAY_S = 86400

Cell = tuple[int, int, str]  # (UTC day start in epoch s, api key id, reason)


def reason_of(exc: BaseException) -> str | None:
    """The refusal reason of a service error; None for errors that are not a refusal of the caller's call."""
    if isinstance(exc, AuthenticationError):
        return "auth"
    if isinstance(exc, RefusalWithDetailsError):
        return exc.reason
    if isinstance(exc, (InvalidRequestError, ModelNotFoundError, PermissionDeniedError, RequestIdReusedError)):
        return "invalid"
    return None


class RefusalCounter:
    """Counts in memory (thread-safe, O(1) per refusal); `flush` writes them to the ledger."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: Counter[Cell] = Counter()

    def count(self, exc: BaseException, *, key_id: int = NO_KEY, now: float | None = None) -> None:
        reason = reason_of(exc)
        if reason is None:
            return
        day = int((time.time() if now is None else now) // DAY_S * DAY_S)
        with self._lock:
            self._pending[(day, key_id or NO_KEY, reason)] += 1

    def pending(self) -> dict[Cell, int]:
        with self._lock:
            return dict(self._pending)

    def flush(self, sessions: sessionmaker[Session]) -> int:
        """Add the pending counts to the ledger in one transaction; returns how many refusals were written. On a
        failure the counts stay pending (and the error propagates)."""
        with self._lock:
            taken, self._pending = self._pending, Counter()
        if not taken:
            return 0
        try:
            with sessions() as session:
                add_refusals(session, counts=taken)
                session.commit()
        except BaseException:
            with self._lock:
                self._pending.update(taken)
            raise
        return sum(taken.values())


def add_refusals(session: Session, *, counts: dict[Cell, int]) -> None:
    """Add `counts` to the counter rows (created when missing): one INSERT ... ON CONFLICT DO UPDATE per cell, in
    a fixed order (two servers on one Postgres cannot deadlock). The caller commits."""
    from sqlalchemy.dialects import postgresql, sqlite

    dialect = session.get_bind().dialect.name
    if dialect not in ("postgresql", "sqlite"):  # pragma: no cover - the ledger supports SQLite and Postgres
        raise NotImplementedError(f"refusal counters on {dialect}")
    table: Table = Refusal.__table__  # type: ignore[assignment]  # a declarative model's table is a Table
    for (day, key_id, reason), n in sorted(counts.items()):
        row = {"day_start": day, "api_key_id": key_id, "reason": reason, "count": n}
        on_conflict: dict[str, Any] = {
            "index_elements": ["day_start", "api_key_id", "reason"],
            "set_": {"count": table.c.count + n},
        }
        if dialect == "postgresql":
            session.execute(postgresql.insert(table).values(row).on_conflict_do_update(**on_conflict))
        else:
            session.execute(sqlite.insert(table).values(row).on_conflict_do_update(**on_conflict))
