"""Billing writes in O(1) per request: usage rows committed together with their replay payloads, the counters'
running totals and the settlement of their quota holds (quota_holds.py admits them), the lookups of what was billed
before, the purge of what expired, and the mapping of transient ledger failures to UNAVAILABLE.

A request is billed at most once: (api_key_id, request_id) is unique, and a batch's rows are inserted in one global
order, so two servers billing overlapping ids cannot deadlock on Postgres; when some id was billed meanwhile, each row
goes in under its own savepoint. Keys' counters are updated in id order (no deadlocks).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, Float, Integer, Table, bindparam, delete, insert, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session

from teacher_server.errors import LedgerUnavailableError
from teacher_server.ledger.models import (
    NewUsage,
    QuotaHold,
    ReplayPayload,
    UsageRecord,
    as_utc,
    usage_record,
    usage_values,
    utcnow,
)
from teacher_server.ledger.quota_holds import (
    COUNTERS,
    Hold,
    drop_hold,
    ensure_counter,
    gflops_in_window,
    give_back,
    rows_changed,
    window_start_at,
)
from teacher_server.ledger.quota_windows import QuotaWindow, window_start

_C = COUNTERS.c
_USAGE: Table = UsageRecord.__table__  # type: ignore[assignment]
_PAYLOADS: Table = ReplayPayload.__table__  # type: ignore[assignment]
# built once: constructing the expression per request costs more than running it
_BILLED_PROBE = select(_USAGE.c.id).where(
    _USAGE.c.api_key_id == bindparam("key"), _USAGE.c.request_id == bindparam("rid")
)
_INSERT_USAGE = insert(_USAGE).returning(_USAGE.c.id, sort_by_parameter_order=True)  # ids in the order given
_INSERT_PAYLOADS = insert(_PAYLOADS)


# A batch's running totals of one key: the quota window restarts when `ws` is past the stored start.
_WS, _ADDED = bindparam("b_ws", type_=Integer), bindparam("b_gflops", type_=Float)
_ADD_BILLED = (
    update(COUNTERS)
    .where(_C.api_key_id == bindparam("b_key"))
    .values(
        requests=_C.requests + bindparam("b_requests"),
        images=_C.images + bindparam("b_images"),
        tokens=_C.tokens + bindparam("b_tokens"),
        gflops=_C.gflops + _ADDED,
        full_gflops=_C.full_gflops + bindparam("b_full_gflops"),
        cost=_C.cost + bindparam("b_cost"),
        window_gflops=gflops_in_window(_WS) + _ADDED,
        window_start=window_start_at(_WS),
        reserved_gflops=_C.reserved_gflops - bindparam("b_held"),
    )
)


@dataclass(frozen=True)
class StoredLogits:
    """A replay payload's logits as the ledger keeps them (written and read by service/accounting/replay_logits.py)."""

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
        held = math.fsum(i.hold.gflops for i in mine if i.hold is not None and drop_hold(session, i.hold))
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
    give_back(session, [hold for i in order if outcome[i] is not None and (hold := items[i].hold) is not None])
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
    give_back(session, holds)
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
