"""Bounded text for error messages: whatever the client sent is named, never echoed whole."""

from __future__ import annotations

ECHO_CHARS = 60  # how much of a client-sent value an error message repeats


def clip(value: object, limit: int = ECHO_CHARS) -> str:
    """`repr(value)` cut to `limit` characters (a string's full length said after the cut)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f" ({len(value)} chars)" if isinstance(value, str) else ""
    return f"{text[:limit]}...{size}"
