"""Budget leases replace per-request reservations: an engine replica holds a slice of a key's budgets for many
requests. Reservations still open at the upgrade are released (their requests' usage still counts when it arrives).

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
    op.create_table(
        "budget_leases",
        sa.Column("lease_id", sa.String(64), primary_key=True),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("tenant_period", sa.String(8), nullable=True),
        sa.Column("key_period", sa.String(8), nullable=True),
        sa.Column("amount_nano_dkk", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("amount_nano_dkk >= 0", name="lease_amount_not_negative"),
    )
    op.create_index("budget_leases_expires", "budget_leases", ["expires_at"])
    # Every amount reserved so far was a reservation of the table that goes: release them all.
    op.execute("UPDATE budget_spend SET reserved_nano_dkk = 0")
    op.drop_index("budget_reservations_created", table_name="budget_reservations")
    op.drop_table("budget_reservations")


def downgrade() -> None:
    op.create_table(
        "budget_reservations",
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("tenant_period", sa.String(8), nullable=True),
        sa.Column("key_period", sa.String(8), nullable=True),
        sa.Column("amount_nano_dkk", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("budget_reservations_created", "budget_reservations", ["created_at"])
    op.execute("UPDATE budget_spend SET reserved_nano_dkk = 0")
    op.drop_index("budget_leases_expires", table_name="budget_leases")
    op.drop_table("budget_leases")
