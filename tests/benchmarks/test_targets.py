"""`make bench`'s target table: the tenants targets are judged only where the greedy key's flood ran. No tensors:
no dtype or device applies."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.report.targets import FLOOD_NEVER_RAN, tenants_targets

pytestmark = pytest.mark.dtype("none")


def tenants_section(*, answered: int, billed: int, undelivered: int = 0) -> dict[str, Any]:
    light = {
        "alone": {"p50_ms": 40.0, "p99_ms": 50.0, "errors": {}},
        "flood": {"p50_ms": 45.0, "p99_ms": 60.0, "errors": {}},
        "p99_ratio": 1.2,
    }
    greedy = {
        "sent": 128,
        "images": 96,
        "answered": answered,
        "billed": billed,
        "billed_undelivered": undelivered,
        "codes": {},
    }
    return {"light": light, "greedy": greedy}


def test_a_flood_refused_whole_is_not_a_pass_of_either_tenants_target() -> None:
    isolation, undelivered = tenants_targets(tenants_section(answered=0, billed=0))
    assert isolation.result == undelivered.result == "N/A"
    assert FLOOD_NEVER_RAN in isolation.detail and "0 of 128 greedy 96-image calls answered" in isolation.detail


def test_a_flood_that_ran_is_judged_and_one_billed_but_never_received_still_counts() -> None:
    isolation, undelivered = tenants_targets(tenants_section(answered=12, billed=12))
    assert (isolation.result, undelivered.result) == ("PASS", "PASS")
    late_only = tenants_targets(tenants_section(answered=0, billed=2, undelivered=2))
    assert [t.result for t in late_only] == ["PASS", "MISS"]  # billed twice, received never: a miss, not N/A
