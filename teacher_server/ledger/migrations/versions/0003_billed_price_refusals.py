"""The price and currency each usage row was billed at, and per-day counters of refused calls (issue 13).

Rows billed before this revision get the price that was in force where the ledger still shows it: the key's own
price when the row's cost equals gflops * that price exactly (the key's price then was its price now), otherwise
cost / gflops (the price the server computed the cost with, to the last bit of a float division); NULL when the row
has no GFLOPs. Their currency was never recorded: it stays NULL ("unknown"), and reports show it as such instead of
guessing from today's --currency.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("usage", sa.Column("price_per_gflop", sa.Double(), nullable=True))
    op.add_column("usage", sa.Column("currency", sa.String(16), nullable=True))
    key_price = "(SELECT k.price_per_gflop FROM api_keys k WHERE k.id = usage.api_key_id)"
    op.execute(
        f"UPDATE usage SET price_per_gflop = CASE "
        f"WHEN {key_price} IS NOT NULL AND cost = gflops * {key_price} THEN {key_price} "
        f"WHEN gflops > 0 THEN cost / gflops ELSE NULL END"
    )
    op.create_table(
        "refusals",
        sa.Column("day_start", sa.BigInteger(), nullable=False),
        sa.Column("api_key_id", sa.Integer(), nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
        sa.PrimaryKeyConstraint("day_start", "api_key_id", "reason"),
    )


def downgrade() -> None:
    op.drop_table("refusals")
    op.drop_column("usage", "currency")
    op.drop_column("usage", "price_per_gflop")
