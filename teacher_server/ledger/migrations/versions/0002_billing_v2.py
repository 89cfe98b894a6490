"""Content digests, replay payloads apart from billing rows, per-key counters, quota holds, quota windows and rate
limits (issue 9).

Stored logits move from `usage` to `replay_payloads` and are kept 7 days from the upgrade; rows billed before this
revision have no content digest, so a retry of one of them is replayed without comparing inputs. `key_counters` is
filled from the usage rows (every key had a lifetime quota window then).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

KEPT_REPLAYS = timedelta(days=7)  # the default --replay-ttl, counted from the upgrade


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("quota_window", sa.String(16), nullable=False, server_default="lifetime"))
    op.add_column("api_keys", sa.Column("rate_limit_gflops_per_min", sa.Double(), nullable=True))
    op.add_column("usage", sa.Column("content_digest", sa.String(64), nullable=True))

    op.create_table(
        "replay_payloads",
        sa.Column("usage_id", sa.Integer(), nullable=False),
        sa.Column("logits", sa.LargeBinary(), nullable=False),
        sa.Column("logits_shape", sa.String(64), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("usage_id"),
        sa.ForeignKeyConstraint(["usage_id"], ["usage.id"], ondelete="CASCADE"),
    )
    op.create_index("ix_replay_payloads_expires_at", "replay_payloads", ["expires_at"])
    expires = datetime.now(UTC) + KEPT_REPLAYS
    op.get_bind().execute(
        sa.text(
            "INSERT INTO replay_payloads (usage_id, logits, logits_shape, expires_at) "
            "SELECT id, logits, logits_shape, :expires FROM usage "
            "WHERE logits IS NOT NULL AND logits_shape IS NOT NULL"
        ).bindparams(sa.bindparam("expires", type_=sa.DateTime(timezone=True))),
        {"expires": expires},
    )
    op.drop_column("usage", "logits")  # native ALTER TABLE ... DROP COLUMN (SQLite >= 3.35): no table copy
    op.drop_column("usage", "logits_shape")

    zero = sa.text("0")
    op.create_table(
        "key_counters",
        sa.Column("api_key_id", sa.Integer(), nullable=False),
        *[
            sa.Column(name, sa.BigInteger(), nullable=False, server_default=zero)
            for name in ("requests", "images", "tokens")
        ],
        *[
            sa.Column(name, sa.Double(), nullable=False, server_default=zero)
            for name in ("gflops", "full_gflops", "cost", "reserved_gflops")
        ],
        sa.Column("window_start", sa.BigInteger(), nullable=False, server_default=zero),
        sa.Column("window_gflops", sa.Double(), nullable=False, server_default=zero),
        sa.Column("rate_start", sa.BigInteger(), nullable=False, server_default=zero),
        sa.Column("rate_gflops", sa.Double(), nullable=False, server_default=zero),
        sa.PrimaryKeyConstraint("api_key_id"),
        sa.ForeignKeyConstraint(["api_key_id"], ["api_keys.id"], ondelete="CASCADE"),
    )
    op.execute(
        "INSERT INTO key_counters (api_key_id, requests, images, tokens, gflops, full_gflops, cost, "
        "reserved_gflops, window_start, window_gflops, rate_start, rate_gflops) "
        "SELECT k.id, COUNT(u.id), COALESCE(SUM(u.images), 0), COALESCE(SUM(u.tokens), 0), "
        "COALESCE(SUM(u.gflops), 0), COALESCE(SUM(u.full_gflops), 0), COALESCE(SUM(u.cost), 0), 0, 0, "
        "COALESCE(SUM(u.gflops), 0), 0, 0 FROM api_keys k LEFT JOIN usage u ON u.api_key_id = k.id GROUP BY k.id"
    )
    op.create_table(
        "quota_holds",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("api_key_id", sa.Integer(), nullable=False),
        sa.Column("gflops", sa.Double(), nullable=False),
        sa.Column("rate_start", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.ForeignKeyConstraint(["api_key_id"], ["api_keys.id"], ondelete="CASCADE"),
    )
    op.create_index("ix_quota_holds_expires_at", "quota_holds", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_quota_holds_expires_at", table_name="quota_holds")
    op.drop_table("quota_holds")
    op.drop_table("key_counters")
    op.add_column("usage", sa.Column("logits", sa.LargeBinary(), nullable=True))
    op.add_column("usage", sa.Column("logits_shape", sa.String(64), nullable=True))
    op.execute(
        "UPDATE usage SET logits = (SELECT p.logits FROM replay_payloads p WHERE p.usage_id = usage.id), "
        "logits_shape = (SELECT p.logits_shape FROM replay_payloads p WHERE p.usage_id = usage.id)"
    )
    op.drop_index("ix_replay_payloads_expires_at", table_name="replay_payloads")
    op.drop_table("replay_payloads")
    op.drop_column("usage", "content_digest")
    op.drop_column("api_keys", "rate_limit_gflops_per_min")
    op.drop_column("api_keys", "quota_window")
