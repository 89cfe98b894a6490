"""A key's quota and rate-limit state, and a busy server's refusals, on the wire: response metadata in the style of
the `x-ratelimit-*` headers of the big model APIs, and the google.rpc QuotaFailure / RetryInfo details of a
RESOURCE_EXHAUSTED (or DEADLINE_EXCEEDED) status.

Metadata (only for the limits a key has; a key without limits gets none):
  x-ratelimit-limit-gflops       GFLOPs the key may be admitted per minute
  x-ratelimit-remaining-gflops   GFLOPs left in the current minute
  x-ratelimit-reset-gflops       time until the minute starts over, e.g. "12.5s"
  x-quota-limit-gflops           GFLOPs the key may be billed per quota window
  x-quota-remaining-gflops       GFLOPs left in the window (after this request's own)
  x-quota-window                 lifetime | month | day (UTC calendar)
  x-quota-reset                  time until the window starts over, e.g. "3600s" (absent for lifetime)
"""

from __future__ import annotations

from google.rpc import error_details_pb2

from teacher_server.errors import DeadlineUnmetError, OverloadedError, QuotaExceededError, retry_info
from teacher_server.ledger.quota_holds import LimitState
from teacher_server.service.accounting.auth import KeyInfo


def _seconds(value: float) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".") + "s"


def limit_metadata(state: LimitState | None) -> tuple[tuple[str, str], ...]:
    if state is None:
        return ()
    md: list[tuple[str, str]] = []
    if state.rate_limit_gflops is not None:
        md += [
            ("x-ratelimit-limit-gflops", f"{state.rate_limit_gflops:.9g}"),
            ("x-ratelimit-remaining-gflops", f"{state.rate_remaining_gflops or 0.0:.9g}"),
            ("x-ratelimit-reset-gflops", _seconds(state.rate_reset_s or 0.0)),
        ]
    if state.quota_gflops is not None:
        md += [
            ("x-quota-limit-gflops", f"{state.quota_gflops:.9g}"),
            ("x-quota-remaining-gflops", f"{state.quota_remaining_gflops or 0.0:.9g}"),
            ("x-quota-window", state.quota_window),
        ]
        if state.quota_reset_s is not None:
            md.append(("x-quota-reset", _seconds(state.quota_reset_s)))
    return tuple(md)


# Per limit: the QuotaFailure violation's description and the error message when a request does not fit in it
_SHORT_OF = {
    "quota": (
        "{window} quota of {limit:.6g} GFLOPs: {left:.6g} left, {needed:.6g} needed",
        "{window} quota exceeded: {left:.6g} of {limit:.6g} GFLOPs left, this request needs {needed:.6g}",
    ),
    "rate_limit": (
        "rate limit of {limit:.6g} GFLOPs per minute: {left:.6g} left, {needed:.6g} needed",
        "rate limit of {limit:.6g} GFLOPs/min reached ({left:.6g} left, this request needs {needed:.6g})",
    ),
}


def quota_exceeded(*, key: KeyInfo, needed_gflops: float, state: LimitState) -> QuotaExceededError:
    """The refusal of a request the key's quota window or rate limit has no room for (nothing billed): says which
    limit, how much is left, and when to retry (no RetryInfo for a lifetime quota: waiting does not help)."""
    limits = {  # (limit, left) of each
        "quota": (state.quota_gflops, state.quota_remaining_gflops),
        "rate_limit": (state.rate_limit_gflops, state.rate_remaining_gflops),
    }
    short = [name for name, (_, left) in limits.items() if left is not None and needed_gflops > left]
    violations, messages = [], []
    for name in short:
        limit, left = limits[name]
        assert limit is not None
        values = {"window": state.quota_window, "limit": limit, "left": left, "needed": needed_gflops}
        description, message = (text.format(**values) for text in _SHORT_OF[name])
        violations.append(
            error_details_pb2.QuotaFailure.Violation(subject=f"api_key:{key.name}", description=description)
        )
        messages.append(message)
    quota_short = "quota" in short
    retry_s = state.quota_reset_s if quota_short else None
    if "rate_limit" in short and (not quota_short or retry_s is not None):
        retry_s = max(retry_s or 0.0, state.rate_reset_s or 0.0)
    if not violations:  # lost a race between the check and the read: the room went to another request
        messages.append("no room left right now")
        retry_s = 1.0
    details: list[object] = [error_details_pb2.QuotaFailure(violations=violations)]
    if retry_s is not None:
        details.append(retry_info(retry_s))
    error = QuotaExceededError(
        f"API key {key.name!r}: {'; '.join(messages)}; nothing was billed",
        details=tuple(details),
        trailing_metadata=limit_metadata(state),
    )
    error.reason = "quota" if quota_short or len(violations) != 1 else "rate_limit"  # refusal counters' reason
    return error


def overloaded(why: str, *, retry_s: float) -> OverloadedError:
    """The refusal of a request the queues have no room for, before it is decoded: nothing billed, retry later."""
    return OverloadedError(
        f"server busy: {why}; nothing was billed: retry in {retry_s:.2g} s or later", details=(retry_info(retry_s),)
    )


def deadline_unmet(*, wait_s: float, time_left_s: float) -> DeadlineUnmetError:
    """The refusal of a request whose deadline would pass before its answer could be sent: refused at once, unbilled."""
    return DeadlineUnmetError(
        f"the answer would take about {wait_s:.3g} s (queue and compute), the request's deadline leaves "
        f"{max(time_left_s, 0.0):.3g} s; not run, nothing billed: retry with a later deadline or after a while",
        details=(retry_info(wait_s),),
    )
