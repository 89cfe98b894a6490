"""Quota windows: what a key's quota counts (all its usage, or the current UTC calendar month or day) and where a
window starts and ends. The one definition the ledger, billing, the CLI and the dashboard use; free of SQLAlchemy, so
the CLI offers the choices without loading the ORM."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Literal, get_args

QuotaWindow = Literal["lifetime", "month", "day"]
QUOTA_WINDOWS: tuple[QuotaWindow, ...] = get_args(QuotaWindow)


def window_start(quota_window: QuotaWindow, now: datetime) -> int:
    """Epoch seconds where the quota window holding `now` began (UTC calendar day or month; 0 for lifetime)."""
    now = now.astimezone(UTC)
    if quota_window == "day":
        return int(now.replace(hour=0, minute=0, second=0, microsecond=0).timestamp())
    if quota_window == "month":
        return int(now.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp())
    return 0


def next_window_start(quota_window: QuotaWindow, start: int) -> int | None:
    """Epoch seconds where the window that began at `start` ends; None for lifetime (it never does)."""
    begun = datetime.fromtimestamp(start, UTC)
    if quota_window == "day":
        return int((begun + timedelta(days=1)).timestamp())
    if quota_window == "month":
        return int((begun.replace(day=28) + timedelta(days=4)).replace(day=1).timestamp())
    return None
