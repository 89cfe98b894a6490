"""One retry policy for every transport (blocking, asyncio, stream): wait for a teacher that is restarting.

A call that fails with UNAVAILABLE or DEADLINE_EXCEEDED (the teacher down, restarting, or answering "ledger
unavailable, not billed, retry") is sent again under the same request_id, with jittered exponential backoff, for up to
`patience_s` seconds (and at least `min_retries` times). RESOURCE_EXHAUSTED with a google.rpc.RetryInfo detail (a rate
limit) is retried after the delay it names, when that fits in the patience; without one (a quota) it is final.
Retries use gRPC wait-for-ready, so an attempt waits for the channel to connect instead of failing at once, within a
deadline cut to the patience left. The server answers a retried request it already billed from its ledger (replayed,
unbilled), so waiting never pays twice.

Per outage (across all calls sharing the policy), one line on stderr when the waiting starts and one when the teacher
answers again.
"""

from __future__ import annotations

import random
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TextIO

import grpc

from maskedkd.text import first_line
from student_client.errors import RETRYABLE_CODES, error_from_rpc

DEFAULT_PATIENCE_S = 120.0  # longer than a teacher restart (model load, ~5-30 s) with room for a slow host


def tls_refused(err: grpc.RpcError) -> bool:
    """The TLS handshake failed (an untrusted or wrong certificate): waiting for the teacher cannot mend that."""
    details = err.details() if hasattr(err, "details") else ""
    return "handshake failed" in (details or "").lower()


def backoff_delay(attempt: int, backoff_s: float, max_backoff_s: float = float("inf")) -> float:
    """Exponential backoff with +-25% jitter so that many workers do not retry in lockstep."""
    return min(max_backoff_s, backoff_s * (2**attempt)) * random.uniform(0.75, 1.25)


def retry_info_delay(retry_after: float, patience_left: float) -> float:
    """The wait before retrying a call the server refused with a RetryInfo: at least what it asked, spread over up to
    1.5x of it so that the many workers it refused at once do not all come back in the same instant."""
    return min(retry_after * random.uniform(1.0, 1.5), max(retry_after, patience_left))


def retry_after_s(err: grpc.RpcError) -> float | None:
    """The google.rpc.RetryInfo delay a RESOURCE_EXHAUSTED status carries (a rate limit, a full queue), or None."""
    try:
        from google.rpc import error_details_pb2, status_pb2
    except ImportError:  # googleapis-common-protos not installed: no details to read
        return None
    trailing = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for key, value in trailing or ():
        if key != "grpc-status-details-bin":
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except Exception:  # noqa: BLE001 - a malformed detail is no retry hint
            return None
        for detail in status.details:
            info = error_details_pb2.RetryInfo()
            if detail.Unpack(info):
                return max(0.0, info.retry_delay.ToTimedelta().total_seconds())
    return None


@dataclass
class RetryPolicy:
    """Shared by every call of one client; thread-safe. `Attempts` carries the state of one call."""

    target: str  # HOST:PORT, for messages
    timeout_s: float = 60.0  # deadline of one attempt
    patience_s: float = DEFAULT_PATIENCE_S  # keep retrying a transient failure this long
    min_retries: int = 4  # ... and at least this many times
    backoff_s: float = 0.25  # first retry waits ~backoff_s, then doubles
    max_backoff_s: float = 5.0  # ... up to this
    log: TextIO | None = None  # where the waiting/back lines go (None: sys.stderr at the time)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _waiting_since: float | None = field(default=None, init=False, repr=False)

    def start(self) -> Attempts:
        return Attempts(self)

    # ---- one line per outage ----------------------------------------------------------------------------------
    def _say(self, line: str) -> None:
        stream = self.log or sys.stderr
        print(f"student-client: {line}", file=stream, flush=True)

    def note_waiting(self, err: grpc.RpcError) -> None:
        if self.patience_s <= 0:  # fail-fast use (a pre-flight check): no waiting to announce
            return
        with self._lock:
            if self._waiting_since is not None:
                return
            self._waiting_since = time.monotonic()
        detail = first_line(err.details(), 200) if hasattr(err, "details") else ""
        self._say(
            f"teacher at {self.target} unavailable ({err.code().name}: {detail}); waiting up to "
            f"{self.patience_s:g}s, retrying under the same request ids"
        )

    def note_answered(self) -> None:
        if self._waiting_since is None:  # the common case, without the lock
            return
        with self._lock:
            since, self._waiting_since = self._waiting_since, None
        if since is not None:
            self._say(f"teacher at {self.target} is back after {time.monotonic() - since:.1f}s")


class Attempts:
    """The retry state of one call (or of one stream's outage): `failed(err)` says how long to sleep, or raises."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.count = 0  # failed attempts so far
        self.first_failure: float | None = None

    @property
    def waiting(self) -> bool:
        return self.first_failure is not None

    def patience_left(self) -> float:
        if self.first_failure is None:
            return self.policy.patience_s
        return self.policy.patience_s - (time.monotonic() - self.first_failure)

    def timeout(self) -> float:
        """Deadline of the next attempt: the policy's, cut to the patience left once the call is retrying (but long
        enough for one forward to finish)."""
        if self.first_failure is None:
            return self.policy.timeout_s
        return min(self.policy.timeout_s, max(self.patience_left(), 1.0))

    def failed(self, err: grpc.RpcError) -> float:
        """The delay before the next attempt, or raises the typed TeacherError when the call must not be retried."""
        code = err.code() if hasattr(err, "code") else None
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # a rate limit or a full queue says when to come back
            delay = retry_after_s(err)
            if delay is None or delay > self.patience_left():  # a quota does not
                raise error_from_rpc(err, self.policy.target, attempts=self.count + 1)
            self.count += 1
            return retry_info_delay(delay, self.patience_left())
        if code not in RETRYABLE_CODES or tls_refused(err):
            raise error_from_rpc(err, self.policy.target, attempts=self.count + 1)
        now = time.monotonic()
        if self.first_failure is None:
            self.first_failure = now
        self.count += 1
        if now - self.first_failure >= self.policy.patience_s and self.count > self.policy.min_retries:
            raise error_from_rpc(err, self.policy.target, attempts=self.count)
        self.policy.note_waiting(err)
        delay = backoff_delay(self.count - 1, self.policy.backoff_s, self.policy.max_backoff_s)
        return max(0.0, min(delay, self.patience_left())) if self.count > self.policy.min_retries else delay

    @staticmethod
    def sleep(delay_s: float) -> None:
        time.sleep(delay_s)

    def succeeded(self) -> None:
        self.policy.note_answered()
        self.count, self.first_failure = 0, None
