"""Markdown tables for the benchmark reports (docs/benchmarks.md and docs/gpu.md)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

Section = dict[str, Any]  # one section of a run's results, as the JSON holds it


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


Column = tuple[str, Callable[[Any], Any]]  # a table column: its header, and its cell for one item


def columns_table(columns: Sequence[Column], items: Iterable[Any]) -> str:
    """A table with the headers of `columns` and a row per item: the cells of `columns` for it."""
    return table([header for header, _ in columns], [[cell(x) for _, cell in columns] for x in items])


def model_tables(s: Section, columns: Sequence[Column], caption: Callable[[Section], str]) -> list[str]:
    """A table per model of section `s`: its caption, then a row per item of its "rows"."""
    return [f"{caption(m)}\n\n" + columns_table(columns, m["rows"]) for m in s["models"]]


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def keep(k: float) -> str:
    return f"{100 * k:.0f}%"


KEEP: Column = ("keep", lambda x: keep(x["keep"]))  # the column of most tables
