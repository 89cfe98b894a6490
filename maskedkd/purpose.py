"""The purpose label of an InferRequest (what the client asks for, for cost attribution): empty for training targets,
or 1-32 characters of [a-z0-9_-] such as "probe". Checked where it enters: the server (a request) and the client's
request building (its public API). It never changes the answer or the bill; reports total each purpose apart."""

from __future__ import annotations

import re

MAX_PURPOSE_CHARS = 32
PROBE = "probe"  # what student_client labels the fidelity probes of `--keep auto` with
_PURPOSE = re.compile(rf"[a-z0-9_-]{{1,{MAX_PURPOSE_CHARS}}}")


def purpose_problem(purpose: str) -> str | None:
    """None when `purpose` is a valid label (empty included), else one line saying what is wrong with it."""
    if purpose == "" or _PURPOSE.fullmatch(purpose):
        return None
    shown = repr(purpose[:40]) + ("..." if len(purpose) > 40 else "")
    if len(purpose) > MAX_PURPOSE_CHARS:
        return f"purpose {shown} is {len(purpose)} characters; at most {MAX_PURPOSE_CHARS} allowed"
    return f"purpose {shown} may hold only lowercase letters, digits, '_' and '-'"
