"""Tenants (organisations) with plans and budgets, members in roles, per-key roles, allow-lists, budgets and rate
limits, per-kind costs of usage, budget spend and reservations, and the audit log.

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
    op.create_table(
        "tenants",
        sa.Column("tenant", sa.String(64), primary_key=True),
        sa.Column("display_name", sa.String(128), nullable=False),
        sa.Column("plan", sa.String(16), nullable=False, server_default="payg"),
        sa.Column("plan_fee_ore", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("discount_bp", sa.Integer, nullable=False, server_default="0"),
        sa.Column("budget_kind", sa.String(16), nullable=True),
        sa.Column("budget_nano_dkk", sa.BigInteger, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("plan IN ('payg', 'monthly')", name="tenant_plan"),
        sa.CheckConstraint("budget_kind IS NULL OR budget_kind IN ('monthly', 'prepaid')", name="tenant_budget_kind"),
        sa.CheckConstraint("discount_bp >= 0 AND discount_bp <= 10000", name="tenant_discount"),
    )
    # Keys made before tenants existed: their tenants become pay-as-you-go organisations.
    op.execute(
        "INSERT INTO tenants (tenant, display_name, plan, plan_fee_ore, discount_bp, created_at) "
        "SELECT DISTINCT tenant, tenant, 'payg', 0, 0, CURRENT_TIMESTAMP FROM api_keys"
    )
    op.create_table(
        "members",
        sa.Column("member_id", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(64), sa.ForeignKey("tenants.tenant"), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("removed_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("role IN ('owner', 'admin', 'member', 'viewer')", name="member_role"),
    )
    op.create_index("members_tenant", "members", ["tenant"])
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("name", sa.String(64), nullable=True))
        batch.add_column(sa.Column("member_id", sa.String(32), nullable=True))
        # Keys made before roles existed could do everything a key could do then: call models.
        batch.add_column(sa.Column("role", sa.String(16), nullable=False, server_default="member"))
        batch.add_column(sa.Column("allowed_models", sa.Text, nullable=True))
        batch.add_column(sa.Column("budget_nano_dkk", sa.BigInteger, nullable=True))
        batch.add_column(sa.Column("rpm", sa.Integer, nullable=True))
        batch.add_column(sa.Column("tpm", sa.Integer, nullable=True))
    with op.batch_alter_table("usage_events") as batch:
        batch.add_column(sa.Column("cost_input_uncached_nano_dkk", sa.BigInteger, nullable=False, server_default="0"))
        batch.add_column(sa.Column("cost_input_cached_nano_dkk", sa.BigInteger, nullable=False, server_default="0"))
        batch.add_column(sa.Column("cost_output_nano_dkk", sa.BigInteger, nullable=False, server_default="0"))
    # Rows from before the split: their whole cost is shown as output until re-priced (dev databases only).
    op.execute(
        "UPDATE usage_events SET cost_output_nano_dkk = cost_nano_dkk "
        "WHERE cost_input_uncached_nano_dkk = 0 AND cost_input_cached_nano_dkk = 0 AND cost_output_nano_dkk = 0"
    )
    op.create_index("usage_events_key_started", "usage_events", ["key_id", "started_at"])
    op.create_table(
        "budget_spend",
        sa.Column("scope", sa.String(8), primary_key=True),
        sa.Column("scope_id", sa.String(64), primary_key=True),
        sa.Column("period", sa.String(8), primary_key=True),
        sa.Column("spent_nano_dkk", sa.BigInteger, nullable=False),
        sa.Column("reserved_nano_dkk", sa.BigInteger, nullable=False),
        sa.CheckConstraint("reserved_nano_dkk >= 0", name="reserved_not_negative"),
    )
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
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=True),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(128), nullable=False),
        sa.Column("details", sa.Text, nullable=False),
    )
    op.create_index("audit_log_tenant_at", "audit_log", ["tenant", "at"])


def downgrade() -> None:
    op.drop_index("audit_log_tenant_at", table_name="audit_log")
    op.drop_table("audit_log")
    op.drop_index("budget_reservations_created", table_name="budget_reservations")
    op.drop_table("budget_reservations")
    op.drop_table("budget_spend")
    op.drop_index("usage_events_key_started", table_name="usage_events")
    with op.batch_alter_table("usage_events") as batch:
        for column in ("cost_output_nano_dkk", "cost_input_cached_nano_dkk", "cost_input_uncached_nano_dkk"):
            batch.drop_column(column)
    with op.batch_alter_table("api_keys") as batch:
        for column in ("tpm", "rpm", "budget_nano_dkk", "allowed_models", "role", "member_id", "name"):
            batch.drop_column(column)
    op.drop_index("members_tenant", table_name="members")
    op.drop_table("members")
    op.drop_table("tenants")
