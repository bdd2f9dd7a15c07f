"""Usage ledger: one row per request (counts and the cost billed, never content) and model prices over time.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_prices",
        sa.Column("model", sa.String(128), primary_key=True),
        sa.Column("effective_from", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("input_uncached_nano_dkk", sa.BigInteger, nullable=False),
        sa.Column("input_cached_nano_dkk", sa.BigInteger, nullable=False),
        sa.Column("output_nano_dkk", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "usage_events",
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("cached_tokens", sa.Integer, nullable=False),
        sa.Column("completion_tokens", sa.Integer, nullable=False),
        sa.Column("cost_nano_dkk", sa.BigInteger, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.CheckConstraint("cached_tokens <= prompt_tokens", name="cached_within_prompt"),
        sa.CheckConstraint("prompt_tokens >= 0 AND cached_tokens >= 0 AND completion_tokens >= 0", name="counts"),
    )
    op.create_index("usage_events_tenant_started", "usage_events", ["tenant", "started_at"])


def downgrade() -> None:
    op.drop_index("usage_events_tenant_started", table_name="usage_events")
    op.drop_table("usage_events")
    op.drop_table("model_prices")
