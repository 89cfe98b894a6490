"""`teacher-server`: serve, keys, usage, ledger, health and dashboard."""

from teacher_server.cli.main import main

__all__ = ["main"]
