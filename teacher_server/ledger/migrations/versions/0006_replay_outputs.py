"""Extra outputs kept for replay.

`replay_payloads.outputs`: the serialized `maskedkd.v1.Outputs` a request asked for besides logits (pooled feature,
kept-patch tokens, class attention), so a retry is answered with exactly what was billed. Nullable: rows of
logits-only requests, and every row stored before this revision, have none. One ALTER, no table rebuild.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("replay_payloads", sa.Column("outputs", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    op.drop_column("replay_payloads", "outputs")
