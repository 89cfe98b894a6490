"""What a client sends after the teacher refused to replay a request_id: one rule for every transport.

ALREADY_EXISTS: the id was billed for other content. A resumed training run re-sends its own ids, and its bytes can
differ from the first attempt's when a near-tie of the patch selection flipped (another CPU, precision or thread
count); with `reuse_billed` the request goes again under the same id with `accept_billed_answer`, and the teacher
answers what it billed (nothing billed again). FAILED_PRECONDITION (the stored answer expired), or an ALREADY_EXISTS
that reuse cannot settle: the request goes again under `<id>.r1`, `.r2`, ... and is billed as new work.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from typing import Literal

from student_client.errors import TeacherError
from student_client.transport.outgoing import OutgoingRequest

MAX_RESENDS = 8  # derived ids <id>.r1 .. <id>.r8 tried after a refused replay
# The server cannot replay this id: billed before for other content, or its stored answer expired.
REPLAY_REFUSED = frozenset({"ALREADY_EXISTS", "FAILED_PRECONDITION"})


@dataclass
class ResendPlan:
    request: OutgoingRequest  # what to send next (its message changed in place)
    reuse_billed: bool  # may an ALREADY_EXISTS take the answer billed under this id
    resends: int = 0  # derived ids used so far, each billed as new work
    refusals: int = 0  # refused replays so far

    def __post_init__(self) -> None:
        self.original = self.request.message.request_id

    def after(self, err: TeacherError) -> Literal["reuse", "resend"] | None:
        """Prepare the next attempt after `err`: "reuse" (same id, the billed answer), "resend" (a derived id), or
        None when there is nothing else to try (raise `err`)."""
        if err.code not in REPLAY_REFUSED or not self.original or self.resends == MAX_RESENDS:
            return None
        self.refusals += 1
        message = self.request.message
        if err.code == "ALREADY_EXISTS" and self.reuse_billed and not message.accept_billed_answer:
            message.accept_billed_answer = True
            return "reuse"
        self.resends += 1
        message.accept_billed_answer = False
        message.request_id = f"{self.original}.r{self.resends}"
        return "resend"


@dataclass
class RefusedReplays:
    """A client's counts of refused replays, thread-safe; warns once per client on stderr."""

    mismatched: int = 0  # requests whose replay was refused (content changed, or the answer expired)
    rebilled: int = 0  # of those, sent again under a derived id and billed again
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def note(self, plan: ResendPlan, step: str, reason: str) -> None:
        with self._lock:
            first = self.mismatched == 0 and plan.refusals == 1
            self.mismatched += plan.refusals == 1
            self.rebilled += step == "resend" and plan.resends == 1
        if first:
            what = (
                "taking the answer it billed under that id (not billed again)"
                if step == "reuse"
                else "re-sending under a derived id (billed again; counted as teacher_rebilled_requests)"
            )
            print(
                f"student-client: warning: the teacher cannot replay request id {plan.original} ({reason}); {what}",
                file=sys.stderr,
                flush=True,
            )


class CountsRefusedReplays:
    """The counts every client exposes, read from its `refused_replays`."""

    refused_replays: RefusedReplays

    @property
    def mismatched_requests(self) -> int:
        """Re-sent requests the teacher could not replay as sent (content changed, or the answer expired)."""
        return self.refused_replays.mismatched

    @property
    def rebilled_requests(self) -> int:
        """Of those, the ones sent again under a derived id and billed again."""
        return self.refused_replays.rebilled
