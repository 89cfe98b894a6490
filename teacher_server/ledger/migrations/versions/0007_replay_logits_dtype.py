"""Replay logits kept in the dtype that computed them.

`replay_payloads.logits_dtype`: NULL for float32 little-endian logits (every row stored before this revision);
"bfloat16" for the logits of a bf16 forward, stored as the high halves of their float32 values (whose low halves
are all 0, checked when stored): half the bytes, the same float32 values back, bit for bit. One ALTER, no table
rebuild.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("replay_payloads", sa.Column("logits_dtype", sa.String(16), nullable=True))


def downgrade() -> None:
    # bfloat16 payloads cannot be read as float32: drop them (their requests are then refused as expired, unbilled)
    op.execute("DELETE FROM replay_payloads WHERE logits_dtype IS NOT NULL")
    op.drop_column("replay_payloads", "logits_dtype")
