"""Ceilings per organisation, set by the operator: requests and tokens per minute of any of its keys, and how many
active keys it may have (NULL: no ceiling). Its owners and admins set per-key limits within them.

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

CEILINGS = ("max_rpm", "max_tpm", "max_keys")


def upgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        for column in CEILINGS:
            batch.add_column(sa.Column(column, sa.Integer, nullable=True))
        batch.create_check_constraint(
            "tenant_ceilings", " AND ".join(f"({column} IS NULL OR {column} > 0)" for column in CEILINGS)
        )


def downgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        batch.drop_constraint("tenant_ceilings", type_="check")
        for column in reversed(CEILINGS):
            batch.drop_column(column)
