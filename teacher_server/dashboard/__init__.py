"""Billing and FLOP dashboard of the teacher server: FastAPI JSON API, admin API and a page with charts.

`create_app` is imported lazily, so that the CLI can add the dashboard's flags without loading FastAPI.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from teacher_server.dashboard.app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        return import_module("teacher_server.dashboard.app").create_app
    raise AttributeError(f"module 'teacher_server.dashboard' has no attribute {name!r}")
