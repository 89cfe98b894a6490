"""The key service: API keys in the ledger and every change to them (create, disable, enable, limits, price), for the
CLI (`teacher-server keys ...`) and the dashboard's admin API alike. Every value is checked here (`check_change`,
`checked_name`) before anything is written, and every call is one transaction: a change with one invalid part changes
nothing. Servers pick a change up within their auth cache TTL.

Secrets are `mkd_<43 url-safe chars>`, stored only as sha256 hashes.
"""

from __future__ import annotations

import enum
import hashlib
import math
import secrets
from dataclasses import dataclass, fields
from datetime import UTC, datetime

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from teacher_server.ledger.models import (
    ApiKey,
    DuplicateKeyNameError,
    KeyCounter,
    UnknownKeyNameError,
    UsageRecord,
    utcnow,
)
from teacher_server.ledger.quota_holds import ensure_counter
from teacher_server.ledger.quota_windows import QUOTA_WINDOWS, QuotaWindow, window_start
from teacher_server.priorities import PRIORITIES

SECRET_PREFIX = "mkd_"
DISPLAY_PREFIX_CHARS = 12  # stored in clear for display: "mkd_" + 8 random chars
MAX_NAME_CHARS = 200  # the width of api_keys.name


class Unchanged(enum.Enum):
    """The value of a KeyChange field that is to stay as it is (None means something: unlimited, server default)."""

    UNCHANGED = "unchanged"


UNCHANGED = Unchanged.UNCHANGED


@dataclass(frozen=True)
class KeyChange:
    """What to change on a key; the fields left UNCHANGED keep their value. The names are ApiKey's columns."""

    disabled: bool | Unchanged = UNCHANGED
    quota_gflops: float | Unchanged | None = UNCHANGED  # GFLOPs per quota window; None: unlimited
    quota_window: QuotaWindow | Unchanged = UNCHANGED
    rate_limit_gflops_per_min: float | Unchanged | None = UNCHANGED  # None: no rate limit
    price_per_gflop: float | Unchanged | None = UNCHANGED  # None: the serving server's default
    weight: float | Unchanged = UNCHANGED  # share of the teacher against keys with queued work (> 0; default 1)
    priority: str | Unchanged = UNCHANGED  # interactive | standard | batch: served in this order


def _check_number(field: str, value: object, *, above_zero: bool = False) -> None:
    if value is UNCHANGED or value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{field} must be a finite number, not {value!r}")
    if above_zero and not value > 0:
        raise ValueError(f"{field} must be > 0")
    if value < 0:
        raise ValueError(f"{field} must be >= 0")


def check_change(change: KeyChange) -> None:
    """ValueError naming the first invalid value of `change`."""
    if change.disabled is not UNCHANGED and not isinstance(change.disabled, bool):
        raise ValueError(f"disabled must be true or false, not {change.disabled!r}")
    if change.quota_window is not UNCHANGED and change.quota_window not in QUOTA_WINDOWS:
        raise ValueError(f"quota window must be one of {', '.join(QUOTA_WINDOWS)}, not {change.quota_window!r}")
    _check_number("quota_gflops", change.quota_gflops)
    _check_number("rate_limit_gflops_per_min", change.rate_limit_gflops_per_min, above_zero=True)
    _check_number("price_per_gflop", change.price_per_gflop)
    if change.weight is not UNCHANGED:
        if change.weight is None:
            raise ValueError("weight must be a number > 0 (1 is every key's default share)")
        _check_number("weight", change.weight, above_zero=True)
    if change.priority is not UNCHANGED and change.priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}, not {change.priority!r}")


def checked_name(name: str) -> str:
    """The name a key is stored under (stripped); ValueError when it cannot be one."""
    if not name or not name.strip():
        raise ValueError("a key needs a non-empty name")
    if len(name.strip()) > MAX_NAME_CHARS or "\x00" in name:  # the ledger's column; Postgres enforces both
        raise ValueError(f"a key name has at most {MAX_NAME_CHARS} characters and no NUL character")
    return name.strip()


def generate_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)  # 32 random bytes -> 43 url-safe chars


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def create_api_key(
    sessions: sessionmaker[Session],
    *,
    name: str,
    quota_gflops: float | None = None,
    price_per_gflop: float | None = None,
    quota_window: QuotaWindow = "lifetime",
    rate_limit_gflops_per_min: float | None = None,
    weight: float = 1.0,
    priority: str = "standard",
) -> tuple[str, ApiKey]:
    """Create and store a key; returns (secret, row). The secret exists only in this return value."""
    secret = generate_secret()
    with sessions() as session:
        row = add_api_key(
            session,
            name=name,
            key_prefix=secret[:DISPLAY_PREFIX_CHARS],
            key_hash=hash_secret(secret),
            quota_gflops=quota_gflops,
            price_per_gflop=price_per_gflop,
            quota_window=quota_window,
            rate_limit_gflops_per_min=rate_limit_gflops_per_min,
            weight=weight,
            priority=priority,
        )
    return secret, row


NEW_KEY_ARGUMENTS = (
    "name",
    "quota_gflops",
    "price_per_gflop",
    "quota_window",
    "rate_limit_gflops_per_min",
    "weight",
    "priority",
)


def create_api_key_from(sessions: sessionmaker[Session], request: object) -> tuple[str, ApiKey]:
    """`create_api_key` with its arguments read from the attributes of those names (NEW_KEY_ARGUMENTS) of `request`:
    the CLI's parsed `keys create` arguments, the admin API's request body."""
    return create_api_key(sessions, **{name: getattr(request, name) for name in NEW_KEY_ARGUMENTS})


def add_api_key(
    session: Session,
    *,
    name: str,
    key_prefix: str,
    key_hash: str,
    quota_gflops: float | None = None,
    price_per_gflop: float | None = None,
    quota_window: QuotaWindow = "lifetime",
    rate_limit_gflops_per_min: float | None = None,
    weight: float = 1.0,
    priority: str = "standard",
) -> ApiKey:
    """Insert a key (and its zeroed counters) and commit; ValueError for an invalid value, `DuplicateKeyNameError`
    when the name is taken."""
    name = checked_name(name)
    check_change(
        KeyChange(
            quota_gflops=quota_gflops,
            quota_window=quota_window,
            rate_limit_gflops_per_min=rate_limit_gflops_per_min,
            price_per_gflop=price_per_gflop,
            weight=weight,
            priority=priority,
        )
    )
    if find_api_key_by_name(session, name=name) is not None:
        raise DuplicateKeyNameError(f"an API key named {name!r} already exists")
    key = ApiKey(
        name=name,
        key_prefix=key_prefix,
        key_hash=key_hash,
        quota_gflops=quota_gflops,
        price_per_gflop=price_per_gflop,
        disabled=False,
        created_at=utcnow(),
        quota_window=quota_window,
        rate_limit_gflops_per_min=rate_limit_gflops_per_min,
        weight=weight,
        priority=priority,
    )
    session.add(key)
    try:
        session.flush()
        session.add(KeyCounter(api_key_id=key.id, window_start=window_start(quota_window, utcnow())))
        session.commit()
    except IntegrityError as exc:
        session.rollback()
        raise DuplicateKeyNameError(f"an API key named {name!r} already exists") from exc
    return key


def find_api_key_by_hash(session: Session, *, key_hash: str) -> ApiKey | None:
    return session.scalars(select(ApiKey).where(ApiKey.key_hash == key_hash)).one_or_none()


def find_api_key_by_name(session: Session, *, name: str) -> ApiKey | None:
    return session.scalars(select(ApiKey).where(ApiKey.name == name)).one_or_none()


def list_api_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


def update_api_key(session: Session, *, name: str, change: KeyChange) -> ApiKey:
    """Apply `change` to the key named `name` and commit, in one transaction: all of it, or nothing when a value is
    invalid (ValueError) or no key has that name (UnknownKeyNameError)."""
    check_change(change)
    try:
        key = find_api_key_by_name(session, name=name)
        if key is None:
            raise UnknownKeyNameError(f"no API key named {name!r}")
        if change.quota_window is not UNCHANGED and change.quota_window != key.quota_window:
            _restart_quota_window(session, key=key, quota_window=change.quota_window)
        for field in fields(change):
            value = getattr(change, field.name)
            if value is not UNCHANGED:
                setattr(key, field.name, value)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return key


def _restart_quota_window(session: Session, *, key: ApiKey, quota_window: QuotaWindow) -> None:
    """A key's new quota window starts from what the key was billed in it so far (one sum over its rows; an admin
    operation), in the caller's transaction."""
    ws = window_start(quota_window, utcnow())
    since = datetime.fromtimestamp(ws, UTC)
    billed = session.scalar(
        select(func.coalesce(func.sum(UsageRecord.gflops), 0.0)).where(
            UsageRecord.api_key_id == key.id, UsageRecord.created_at >= since
        )
    )
    ensure_counter(session, api_key_id=key.id, ws=ws)
    session.execute(
        update(KeyCounter)
        .where(KeyCounter.api_key_id == key.id)
        .values(window_start=ws, window_gflops=float(billed or 0.0))
    )


def set_api_key_disabled(session: Session, *, name: str, disabled: bool = True) -> ApiKey:
    """Disable (or, with disabled=False, re-enable) a key and commit."""
    return update_api_key(session, name=name, change=KeyChange(disabled=disabled))


def set_api_key_limits(
    session: Session,
    *,
    name: str,
    quota_gflops: float | None,
    quota_window: QuotaWindow,
    rate_limit_gflops_per_min: float | None,
) -> ApiKey:
    """Replace a key's quota (GFLOPs per window; None: unlimited), its window and its rate limit (GFLOPs per minute;
    None: none) and commit."""
    return update_api_key(
        session,
        name=name,
        change=KeyChange(
            quota_gflops=quota_gflops, quota_window=quota_window, rate_limit_gflops_per_min=rate_limit_gflops_per_min
        ),
    )


def set_api_key_share(session: Session, *, name: str, weight: float, priority: str) -> ApiKey:
    """Set a key's fair-share weight and priority class and commit; servers apply it within their auth cache TTL."""
    return update_api_key(session, name=name, change=KeyChange(weight=weight, priority=priority))


def set_api_key_price(session: Session, *, name: str, price_per_gflop: float | None) -> ApiKey:
    """Set the price a key's new requests are billed at (None: the serving server's default) and commit; rows
    billed before keep their price."""
    return update_api_key(session, name=name, change=KeyChange(price_per_gflop=price_per_gflop))
