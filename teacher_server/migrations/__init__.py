"""Alembic migrations of the billing ledger (run through teacher_server.ledger_migrate; no alembic.ini needed)."""
