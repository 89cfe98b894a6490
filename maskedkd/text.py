"""Bounded text for error messages: whatever the client sent is named, never echoed whole, and an exception's
message made one line."""

from __future__ import annotations

ECHO_CHARS = 60  # how much of a client-sent value an error message repeats


def clip(value: object, limit: int = ECHO_CHARS) -> str:
    """`repr(value)` cut to `limit` characters (a string's full length said after the cut)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f" ({len(value)} chars)" if isinstance(value, str) else ""
    return f"{text[:limit]}...{size}"


def one_line(text: object, limit: int | None = None) -> str:
    """`text` (e.g. an exception; None: "") with every run of whitespace, newlines too, made one space, clipped to
    `limit` characters."""
    return " ".join(_text(text).split())[:limit]


def first_line(text: object, limit: int | None = None) -> str:
    """The first non-blank line of `text` (e.g. an exception; None: ""), stripped, clipped to `limit` characters."""
    return next((line.strip() for line in _text(text).splitlines() if line.strip()), "")[:limit]


def _text(text: object) -> str:
    return "" if text is None else str(text)
