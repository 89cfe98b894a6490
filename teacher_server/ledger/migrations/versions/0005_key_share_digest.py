"""Fair share across keys and BLAKE3 content digests.

- `api_keys.weight` (a key's share of the teacher against other keys with queued work, default 1) and
  `api_keys.priority` (interactive, standard or batch; default standard): the micro-batcher's fair queuing reads them
  (teacher_server/engine/batching/scheduler.py). Existing keys get the defaults: one ALTER each, NOT NULL with a server
  default.
- No column changes for BLAKE3 content digests: new rows store "blake3:<base64url>" (50 characters) in the same
  64-character `usage.content_digest`; rows billed before keep their bare sha256 hex and are still compared as
  sha256 (content_digest.py). (Widening the column would rebuild `usage` on SQLite, and dropping the old table
  cascades into `replay_payloads`: a migration must never do that.)

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("weight", sa.Double(), nullable=False, server_default="1"))
    op.add_column("api_keys", sa.Column("priority", sa.String(16), nullable=False, server_default="standard"))


def downgrade() -> None:
    op.drop_column("api_keys", "priority")
    op.drop_column("api_keys", "weight")
