"""Billing writes in O(1) per request: quota holds reserved with one conditional UPDATE of the key's counters, usage
rows committed together with their replay payloads and the counters' running totals, and the purge of what expired.

Why it holds across servers on one database: admission is a single `UPDATE key_counters ... WHERE <room left>`,
which the database serializes per row, so two servers can never admit more than the quota together; GFLOPs stay
held (`reserved_gflops`, one `quota_holds` row per request) until the usage row commits or the request fails. A hold
left by a crashed server expires and the purge gives its GFLOPs back. Keys are updated in id order (no deadlocks).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import (
    ColumnElement,
    Connection,
    CursorResult,
    Executable,
    Float,
    Integer,
    Table,
    bindparam,
    case,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session

from teacher_server.errors import LedgerUnavailableError
from teacher_server.ledger.models import (
    KeyCounter,
    NewUsage,
    QuotaHold,
    ReplayPayload,
    UsageRecord,
    as_utc,
    usage_record,
    usage_values,
    utcnow,
)
from teacher_server.ledger.quota_windows import QuotaWindow, next_window_start, window_start

HOLD_TTL_S = 900.0  # a hold older than this belongs to a dead request (a crashed server); the purge releases it
RATE_WINDOW_S = 60  # the rate limit counts GFLOPs admitted per minute (fixed windows, UTC)
_COUNTERS: Table = KeyCounter.__table__  # type: ignore[assignment]  # a declarative model's table is a Table
_USAGE: Table = UsageRecord.__table__  # type: ignore[assignment]
_PAYLOADS: Table = ReplayPayload.__table__  # type: ignore[assignment]
# built once: constructing the expression per request costs more than running it
_BILLED_PROBE = select(_USAGE.c.id).where(
    _USAGE.c.api_key_id == bindparam("key"), _USAGE.c.request_id == bindparam("rid")
)
_C = _COUNTERS.c
_INSERT_USAGE = insert(_USAGE).returning(_USAGE.c.id, sort_by_parameter_order=True)  # ids in the order given
_INSERT_PAYLOADS = insert(_PAYLOADS)


def _window_used(ws: int | ColumnElement[int]) -> ColumnElement[float]:
    """The GFLOPs of the quota window starting at `ws`: the stored ones, or 0 when the stored window is older."""
    return case((_C.window_start < ws, 0.0), else_=_C.window_gflops)


def _window_from(ws: int | ColumnElement[int]) -> ColumnElement[int]:
    """The stored window start, moved to `ws` when that is later."""
    return case((_C.window_start < ws, ws), else_=_C.window_start)


# A batch's running totals of one key: the quota window restarts when `ws` is past the stored start.
_WS, _ADDED = bindparam("b_ws", type_=Integer), bindparam("b_gflops", type_=Float)
_ADD_BILLED = (
    update(_COUNTERS)
    .where(_C.api_key_id == bindparam("b_key"))
    .values(
        requests=_C.requests + bindparam("b_requests"),
        images=_C.images + bindparam("b_images"),
        tokens=_C.tokens + bindparam("b_tokens"),
        gflops=_C.gflops + _ADDED,
        full_gflops=_C.full_gflops + bindparam("b_full_gflops"),
        cost=_C.cost + bindparam("b_cost"),
        window_gflops=_window_used(_WS) + _ADDED,
        window_start=_window_from(_WS),
        reserved_gflops=_C.reserved_gflops - bindparam("b_held"),
    )
)


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


@dataclass(frozen=True)
class StoredLogits:
    """A replay payload's logits as the ledger keeps them (service/replay_logits.py writes and reads them)."""

    data: bytes  # little-endian, row-major
    shape: str  # "B,C"
    dtype: str | None = None  # None: float32; "bfloat16": the high halves of float32 values whose low halves are 0


@dataclass(frozen=True)
class Billable:
    """One usage row to commit, with its replay payload and the hold it settles."""

    row: NewUsage
    quota_window: QuotaWindow
    payload: StoredLogits | None = None  # None: not replayable
    hold: Hold | None = None
    outputs: bytes | None = None  # the serialized maskedkd.v1.Outputs asked for, kept with the payload


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
    window_used, rate_used = _window_used(ws), _rate_used(rs)
    conditions = [_C.api_key_id == api_key_id]
    if limits.quota_gflops is not None:
        conditions.append(window_used + _C.reserved_gflops + gflops <= limits.quota_gflops)
    if limits.rate_limit_gflops_per_min is not None:
        conditions.append(rate_used + gflops <= limits.rate_limit_gflops_per_min)
    admit = (
        update(_COUNTERS)
        .where(*conditions)
        .values(
            window_gflops=window_used,
            window_start=_window_from(ws),
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


def _drop_hold(session: Session, hold: Hold) -> bool:
    """Delete the hold; False when it was gone already (released, settled or purged: its GFLOPs were given back)."""
    return rows_changed(session, delete(QuotaHold).where(QuotaHold.id == hold.id)) == 1


def _give_back(session: Session, holds: list[Hold]) -> None:
    """Return the GFLOPs of refused or failed requests: reservation and rate-limit minute alike."""
    for hold in sorted(holds, key=lambda h: (h.api_key_id, h.id)):
        if _drop_hold(session, hold):
            session.execute(
                update(_COUNTERS)
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
    _give_back(session, holds)
    session.commit()


def _settle(session: Session, items: list[Billable], usage_ids: list[int], replay_ttl_s: float, now: float) -> None:
    """Payloads, running totals and held GFLOPs of the rows just inserted (same transaction)."""
    expires = utcnow() + timedelta(seconds=replay_ttl_s)
    payloads = [
        {
            "usage_id": usage_id,
            "logits": item.payload.data,
            "logits_shape": item.payload.shape,
            "logits_dtype": item.payload.dtype,
            "outputs": item.outputs,
            "expires_at": expires,
        }
        for item, usage_id in zip(items, usage_ids, strict=True)
        if item.payload is not None
    ]
    if payloads:  # one executemany: the ORM's unit of work costs more than the SQL on the serving path
        session.execute(_INSERT_PAYLOADS, payloads)
    per_key: dict[int, list[Billable]] = defaultdict(list)
    for item in items:
        per_key[item.row.api_key_id].append(item)
    for key_id in sorted(per_key):
        mine = per_key[key_id]
        held = math.fsum(i.hold.gflops for i in mine if i.hold is not None and _drop_hold(session, i.hold))
        gflops = math.fsum(i.row.gflops for i in mine)
        ws = window_start(mine[0].quota_window, datetime.fromtimestamp(now, UTC))
        totals = {
            "b_key": key_id,
            "b_requests": len(mine),
            "b_images": sum(i.row.images for i in mine),
            "b_tokens": sum(i.row.tokens for i in mine),
            "b_gflops": gflops,
            "b_full_gflops": math.fsum(i.row.full_gflops for i in mine),
            "b_cost": math.fsum(i.row.cost for i in mine),
            "b_ws": ws,
            "b_held": held,
        }
        if rows_changed(session, _ADD_BILLED, totals):
            continue
        ensure_counter(session, api_key_id=key_id, ws=ws)
        session.execute(_ADD_BILLED, totals)


def _insert_usage(session: Session, rows: list[NewUsage], created: datetime) -> list[int]:
    """Insert the usage rows in one statement (Core, not the ORM's unit of work); their ids in the order given."""
    values = [usage_values(row, created) for row in rows]
    return [int(usage_id) for usage_id in session.execute(_INSERT_USAGE, values).scalars()]


def bill(
    session: Session, *, items: list[Billable], replay_ttl_s: float, now: float | None = None
) -> list[UsageRecord | None]:
    """Insert and commit the usage rows of `items` in one transaction, with their replay payloads, the running totals
    and the settlement of their holds. Returns, per item, None when billed now or the row already stored under the
    same (api_key_id, request_id) (billed before: its hold is given back; the caller replays or refuses)."""
    if not items:
        return []
    now = time.time() if now is None else now
    created = utcnow()
    # One global insertion order, so two servers billing overlapping request_ids cannot deadlock on Postgres.
    order = sorted(range(len(items)), key=lambda i: (items[i].row.api_key_id, items[i].row.request_id))
    try:
        usage_ids = _insert_usage(session, [items[i].row for i in order], created)
        _settle(session, [items[i] for i in order], usage_ids, replay_ttl_s, now)
        session.commit()
        return [None] * len(items)
    except IntegrityError:
        session.rollback()
    # Some request_id was billed already (another server, or a race): insert one by one under savepoints.
    outcome: list[UsageRecord | None] = [None] * len(items)
    inserted: list[tuple[Billable, UsageRecord]] = []
    for i in order:
        record = usage_record(items[i].row, created)
        try:
            with session.begin_nested():
                session.add(record)
            inserted.append((items[i], record))
        except IntegrityError:
            outcome[i] = session.scalars(
                select(UsageRecord).where(
                    UsageRecord.api_key_id == items[i].row.api_key_id, UsageRecord.request_id == items[i].row.request_id
                )
            ).one()
    session.flush()
    _settle(session, [b for b, _ in inserted], [r.id for _, r in inserted], replay_ttl_s, now)
    _give_back(session, [hold for i in order if outcome[i] is not None and (hold := items[i].hold) is not None])
    session.commit()
    return outcome


def billed_before(db: Connection | Session, *, api_key_id: int, request_id: str) -> bool:
    """Whether (key, request_id) has a usage row: one indexed read of one column. The serving path asks it of every
    request on a bare Connection (half the CPU of a Session's, whose unit of work it does not need)."""
    return db.execute(_BILLED_PROBE, {"key": api_key_id, "rid": request_id}).first() is not None


def find_billed(
    session: Session, *, api_key_id: int, request_id: str
) -> tuple[UsageRecord, ReplayPayload | None] | None:
    """The usage row of (key, request_id) with its replay payload (None when expired or never kept); None when the id
    was never billed. For an id known billed: asking whether it was (nearly every request's answer is no) is
    `billed_before`'s one indexed read, no ORM objects."""
    record = session.scalars(
        select(UsageRecord).where(UsageRecord.api_key_id == api_key_id, UsageRecord.request_id == request_id)
    ).one_or_none()
    if record is None:
        return None
    payload = session.get(ReplayPayload, record.id)
    if payload is not None and as_utc(payload.expires_at) <= utcnow():
        payload = None
    return record, payload


@dataclass(frozen=True)
class Purged:
    payloads: int  # replay payloads deleted
    holds: int  # expired quota holds given back


def purge(session: Session, *, older_than: timedelta | None = None, now: float | None = None) -> Purged:
    """Delete expired replay payloads (and, with `older_than`, those of rows billed longer ago than that) and give
    back quota holds of requests that died; commits. Billing rows are never deleted."""
    now = time.time() if now is None else now
    stale = ReplayPayload.expires_at <= utcnow()
    if older_than is not None:
        cutoff = utcnow() - older_than
        stale = stale | ReplayPayload.usage_id.in_(select(UsageRecord.id).where(UsageRecord.created_at < cutoff))
    payloads = rows_changed(session, delete(ReplayPayload).where(stale))
    expired = session.execute(select(QuotaHold).where(QuotaHold.expires_at <= int(now))).scalars().all()
    holds = [Hold(h.id, h.api_key_id, h.gflops, h.rate_start) for h in expired]
    _give_back(session, holds)
    session.commit()
    return Purged(payloads=int(payloads or 0), holds=len(holds))


@contextmanager
def unavailable_on_transient_errors() -> Iterator[None]:
    """Turn a ledger failure that a retry can cure (SQLite lock timeout or full disk, a lost or restarting Postgres
    connection, an exhausted pool) into LedgerUnavailableError (UNAVAILABLE); nothing was committed."""
    try:
        yield
    except (OperationalError, InterfaceError, PoolTimeoutError) as exc:
        raise _unavailable(exc) from exc
    except DBAPIError as exc:
        if exc.connection_invalidated:
            raise _unavailable(exc) from exc
        raise


def _unavailable(exc: Exception) -> LedgerUnavailableError:
    cause = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return LedgerUnavailableError(f"ledger unavailable, not billed, retry ({(cause[0] if cause else '')[:160]})")
