"""The purpose each usage row was requested for (InferRequest.purpose: '' for training targets, 'probe' for the
student client's `--keep auto` probes), so reports can show what probes cost beside the rest.

Rows billed before this revision read as training targets (''): the column is NOT NULL with a server default, so
the ALTER fills them in one statement, on SQLite and Postgres alike.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("usage", sa.Column("purpose", sa.String(32), nullable=False, server_default=""))


def downgrade() -> None:
    op.drop_column("usage", "purpose")
