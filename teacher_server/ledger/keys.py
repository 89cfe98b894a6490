"""API keys in the ledger: `mkd_<43 url-safe chars>` secrets stored only as sha256 hashes; creating, finding,
disabling and limiting keys."""
from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timezone

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from teacher_server.ledger.billing import ensure_counter
from teacher_server.ledger.models import (
    QUOTA_WINDOWS,
    ApiKey,
    DuplicateKeyNameError,
    KeyCounter,
    UnknownKeyNameError,
    UsageRecord,
    utcnow,
    window_start,
)

SECRET_PREFIX = "mkd_"


DISPLAY_PREFIX_CHARS = 12  # stored in clear for display: "mkd_" + 8 random chars


MAX_NAME_CHARS = 200       # the width of api_keys.name


def generate_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)  # 32 random bytes -> 43 url-safe chars


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def create_api_key(
    sessions: sessionmaker[Session], *, name: str, quota_gflops: float | None = None,
    price_per_gflop: float | None = None, quota_window: str = "lifetime",
    rate_limit_gflops_per_min: float | None = None,
) -> tuple[str, ApiKey]:
    """Create and store a key; returns (secret, row). The secret exists only in this return value."""
    if not name or not name.strip():
        raise ValueError("a key needs a non-empty name")
    if len(name.strip()) > MAX_NAME_CHARS or "\x00" in name:  # the ledger's column; Postgres enforces both
        raise ValueError(f"a key name has at most {MAX_NAME_CHARS} characters and no NUL character")
    if quota_gflops is not None and quota_gflops < 0:
        raise ValueError("quota_gflops must be >= 0")
    if price_per_gflop is not None and price_per_gflop < 0:
        raise ValueError("price_per_gflop must be >= 0")
    validate_limits(quota_window=quota_window, rate_limit_gflops_per_min=rate_limit_gflops_per_min)
    secret = generate_secret()
    with sessions() as session:
        row = add_api_key(session, name=name.strip(), key_prefix=secret[:DISPLAY_PREFIX_CHARS],
                                 key_hash=hash_secret(secret), quota_gflops=quota_gflops,
                                 price_per_gflop=price_per_gflop, quota_window=quota_window,
                                 rate_limit_gflops_per_min=rate_limit_gflops_per_min)
    return secret, row


def validate_limits(*, quota_window: str, rate_limit_gflops_per_min: float | None) -> None:
    if quota_window not in QUOTA_WINDOWS:
        raise ValueError(f"quota window must be one of {', '.join(QUOTA_WINDOWS)}, not {quota_window!r}")
    if rate_limit_gflops_per_min is not None and not rate_limit_gflops_per_min > 0:
        raise ValueError("rate_limit_gflops_per_min must be > 0")


def add_api_key(
    session: Session, *, name: str, key_prefix: str, key_hash: str, quota_gflops: float | None = None,
    price_per_gflop: float | None = None, quota_window: str = "lifetime",
    rate_limit_gflops_per_min: float | None = None,
) -> ApiKey:
    """Insert a key (and its zeroed counters) and commit; `DuplicateKeyNameError` when the name is taken."""
    if find_api_key_by_name(session, name=name) is not None:
        raise DuplicateKeyNameError(f"an API key named {name!r} already exists")
    key = ApiKey(name=name, key_prefix=key_prefix, key_hash=key_hash, quota_gflops=quota_gflops,
                 price_per_gflop=price_per_gflop, disabled=False, created_at=utcnow(), quota_window=quota_window,
                 rate_limit_gflops_per_min=rate_limit_gflops_per_min)
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


def set_api_key_disabled(session: Session, *, name: str, disabled: bool = True) -> ApiKey:
    """Disable (or re-enable) a key by name and commit; `UnknownKeyNameError` when there is none."""
    key = find_api_key_by_name(session, name=name)
    if key is None:
        raise UnknownKeyNameError(f"no API key named {name!r}")
    key.disabled = disabled
    session.commit()
    return key


def set_api_key_limits(
    session: Session, *, name: str, quota_gflops: float | None, price_per_gflop: float | None,
) -> ApiKey:
    """Replace a key's quota and price (None: unlimited / server default) and commit."""
    key = find_api_key_by_name(session, name=name)
    if key is None:
        raise UnknownKeyNameError(f"no API key named {name!r}")
    key.quota_gflops = quota_gflops
    key.price_per_gflop = price_per_gflop
    session.commit()
    return key


def set_key_limits(session: Session, *, name: str, quota_gflops: float | None, quota_window: str,
                   rate_limit_gflops_per_min: float | None) -> None:
    """Set a key's quota (GFLOPs per window) and rate limit (GFLOPs per minute) and commit. A changed window starts
    from what the key was billed in the new window so far (one sum over its rows; an admin operation)."""
    key = find_api_key_by_name(session, name=name)
    if key is None:
        raise UnknownKeyNameError(f"no API key named {name!r}")
    if key.quota_window != quota_window:
        ws = window_start(quota_window, utcnow())
        since = datetime.fromtimestamp(ws, timezone.utc)
        billed = session.scalar(select(func.coalesce(func.sum(UsageRecord.gflops), 0.0)).where(
            UsageRecord.api_key_id == key.id, UsageRecord.created_at >= since))
        ensure_counter(session, api_key_id=key.id, ws=ws)
        session.execute(update(KeyCounter.__table__).where(KeyCounter.__table__.c.api_key_id == key.id).values(
            window_start=ws, window_gflops=float(billed or 0.0)))
    key.quota_gflops = quota_gflops
    key.quota_window = quota_window
    key.rate_limit_gflops_per_min = rate_limit_gflops_per_min
    session.commit()
