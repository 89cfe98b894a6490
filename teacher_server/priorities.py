"""A key's priority class: `interactive` requests are served before `standard` ones, `standard` before `batch`; keys
share the teacher by weighted fair queuing within a class (engine/batching/scheduler.py). Stored per key in the
ledger."""

from __future__ import annotations

from typing import Literal, get_args

Priority = Literal["interactive", "standard", "batch"]
PRIORITIES: tuple[str, ...] = get_args(Priority)  # served in this order
DEFAULT_PRIORITY: Priority = "standard"


def rank_of(priority: str) -> int:
    """0 for the class served first; an unknown name ranks as the default."""
    return PRIORITIES.index(priority) if priority in PRIORITIES else PRIORITIES.index(DEFAULT_PRIORITY)
