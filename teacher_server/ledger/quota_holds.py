"""Quota admission in O(1) per request: a key's limits, the GFLOPs one request holds between admission and commit,
reserved with one conditional UPDATE of the key's counters (`reserve`), given back when the request is not billed
(`release`), and the limit state its responses report (`limit_state`). billing.py settles the holds when it bills.

Why it holds across servers on one database: admission is a single `UPDATE key_counters ... WHERE <room left>`,
which the database serializes per row, so two servers can never admit more than the quota together; GFLOPs stay
held (`reserved_gflops`, one `quota_holds` row per request) until the usage row commits or the request fails. A hold
left by a crashed server expires and the purge (billing.py) gives its GFLOPs back. Keys are updated in id order (no
deadlocks).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import ColumnElement, CursorResult, Executable, Table, case, delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from teacher_server.ledger.models import KeyCounter, QuotaHold
from teacher_server.ledger.quota_windows import QuotaWindow, next_window_start, window_start

HOLD_TTL_S = 900.0  # a hold older than this belongs to a dead request (a crashed server); the purge releases it
RATE_WINDOW_S = 60  # the rate limit counts GFLOPs admitted per minute (fixed windows, UTC)
COUNTERS: Table = KeyCounter.__table__  # type: ignore[assignment]  # a declarative model's table is a Table
_C = COUNTERS.c


def gflops_in_window(ws: int | ColumnElement[int]) -> ColumnElement[float]:
    """The GFLOPs of the quota window starting at `ws`: the stored ones, or 0 when the stored window is older."""
    return case((_C.window_start < ws, 0.0), else_=_C.window_gflops)


def window_start_at(ws: int | ColumnElement[int]) -> ColumnElement[int]:
    """The stored window start, moved to `ws` when that is later."""
    return case((_C.window_start < ws, ws), else_=_C.window_start)


def rows_changed(session: Session, statement: Executable, params: Mapping[str, object] | None = None) -> int:
    """Execute an UPDATE or DELETE (with `params` for its bound parameters) and return how many rows it changed."""
    result: CursorResult[object] = session.execute(statement, params)  # type: ignore[assignment]  # DML: a cursor
    return int(result.rowcount)


@dataclass(frozen=True)
class KeyLimits:
    quota_gflops: float | None  # None: unlimited
    quota_window: QuotaWindow
    rate_limit_gflops_per_min: float | None

    @property
    def limited(self) -> bool:
        return self.quota_gflops is not None or self.rate_limit_gflops_per_min is not None


@dataclass(frozen=True)
class Hold:
    """GFLOPs one request holds between admission and commit."""

    id: int
    api_key_id: int
    gflops: float
    rate_start: int


@dataclass(frozen=True)
class LimitState:
    """A key's quota and rate-limit state as its responses report it (None fields: no such limit)."""

    quota_gflops: float | None
    quota_window: QuotaWindow
    quota_remaining_gflops: float | None
    quota_reset_s: float | None  # seconds until the quota window starts over; None: lifetime
    rate_limit_gflops: float | None  # per minute
    rate_remaining_gflops: float | None
    rate_reset_s: float | None  # seconds until the rate-limit minute starts over


def _windows(limits: KeyLimits, now: float) -> tuple[int, int]:
    return window_start(limits.quota_window, datetime.fromtimestamp(now, UTC)), int(now // 60 * 60)


def _rate_used(rs: int) -> ColumnElement[float]:
    return case((_C.rate_start < rs, 0.0), else_=_C.rate_gflops)


def limit_state(session: Session, *, api_key_id: int, limits: KeyLimits, now: float | None = None) -> LimitState:
    """The key's state now (one primary-key read)."""
    now = time.time() if now is None else now
    ws, rs = _windows(limits, now)
    counter = session.get(KeyCounter, api_key_id, populate_existing=True)
    window_used = 0.0 if counter is None or counter.window_start < ws else counter.window_gflops
    reserved = 0.0 if counter is None else max(0.0, counter.reserved_gflops)
    rate_used = 0.0 if counter is None or counter.rate_start < rs else counter.rate_gflops
    next_window = next_window_start(limits.quota_window, ws)
    rate = limits.rate_limit_gflops_per_min
    return LimitState(
        quota_gflops=limits.quota_gflops,
        quota_window=limits.quota_window,
        quota_remaining_gflops=None
        if limits.quota_gflops is None
        else max(0.0, limits.quota_gflops - window_used - reserved),
        quota_reset_s=None if next_window is None else max(0.0, next_window - now),
        rate_limit_gflops=rate,
        rate_remaining_gflops=None if rate is None else max(0.0, rate - rate_used),
        rate_reset_s=None if rate is None else max(0.0, rs + RATE_WINDOW_S - now),
    )


def reserve(
    session: Session, *, api_key_id: int, gflops: float, limits: KeyLimits, now: float | None = None
) -> tuple[Hold | None, LimitState]:
    """Admit `gflops` for a key if its quota window and rate limit have room (one conditional UPDATE) and record the
    hold; commits. Returns (hold, state after); hold None when refused (nothing changed)."""
    now = time.time() if now is None else now
    ws, rs = _windows(limits, now)
    window_used, rate_used = gflops_in_window(ws), _rate_used(rs)
    conditions = [_C.api_key_id == api_key_id]
    if limits.quota_gflops is not None:
        conditions.append(window_used + _C.reserved_gflops + gflops <= limits.quota_gflops)
    if limits.rate_limit_gflops_per_min is not None:
        conditions.append(rate_used + gflops <= limits.rate_limit_gflops_per_min)
    admit = (
        update(COUNTERS)
        .where(*conditions)
        .values(
            window_gflops=window_used,
            window_start=window_start_at(ws),
            rate_gflops=rate_used + gflops,
            rate_start=case((_C.rate_start < rs, rs), else_=_C.rate_start),
            reserved_gflops=_C.reserved_gflops + gflops,
        )
    )
    for _ in range(2):
        if rows_changed(session, admit) == 1:
            counter_rate_start = session.scalar(select(_C.rate_start).where(_C.api_key_id == api_key_id))
            hold = QuotaHold(
                api_key_id=api_key_id,
                gflops=gflops,
                rate_start=int(counter_rate_start or 0),  # the UPDATE just matched the row: never None
                expires_at=int(now + HOLD_TTL_S),
            )
            session.add(hold)
            session.flush()
            state = limit_state(session, api_key_id=api_key_id, limits=limits, now=now)
            session.commit()
            return Hold(hold.id, api_key_id, gflops, hold.rate_start), state
        if session.get(KeyCounter, api_key_id) is not None:
            break
        ensure_counter(session, api_key_id=api_key_id, ws=ws)
    state = limit_state(session, api_key_id=api_key_id, limits=limits, now=now)
    session.commit()
    return None, state


def ensure_counter(session: Session, *, api_key_id: int, ws: int) -> None:
    """A key without a counter row (created by an older server while this one ran): start one."""
    try:
        with session.begin_nested():
            session.add(KeyCounter(api_key_id=api_key_id, window_start=ws))
    except IntegrityError:
        pass


def drop_hold(session: Session, hold: Hold) -> bool:
    """Delete the hold; False when it was gone already (released, settled or purged: its GFLOPs were given back)."""
    return rows_changed(session, delete(QuotaHold).where(QuotaHold.id == hold.id)) == 1


def give_back(session: Session, holds: list[Hold]) -> None:
    """Return the GFLOPs of refused or failed requests: reservation and rate-limit minute alike."""
    for hold in sorted(holds, key=lambda h: (h.api_key_id, h.id)):
        if drop_hold(session, hold):
            session.execute(
                update(COUNTERS)
                .where(_C.api_key_id == hold.api_key_id)
                .values(
                    reserved_gflops=_C.reserved_gflops - hold.gflops,
                    rate_gflops=case(
                        (_C.rate_start == hold.rate_start, _C.rate_gflops - hold.gflops), else_=_C.rate_gflops
                    ),
                )
            )


def release(session: Session, *, holds: list[Hold]) -> None:
    """Give back the holds of requests that were not billed, and commit."""
    give_back(session, holds)
    session.commit()
