"""Alembic migrations of the billing ledger (run through teacher_server.ledger.migrate; no alembic.ini needed)."""
