"""The tables of Anker's database as SQLAlchemy Core objects, for queries: tenants, members, keys, prices, usage,
usage set aside, budgets, budget leases and the audit log. Alembic migrations (``deployments/migrations``) create
them; never this file.

Nothing here holds prompt or completion text: counts, ids, model names, amounts and timestamps only.
"""

from __future__ import annotations

import sqlalchemy as sa

METADATA = sa.MetaData()

TENANTS = sa.Table(
    "tenants",
    METADATA,
    sa.Column("tenant", sa.String(64), primary_key=True),
    sa.Column("display_name", sa.String(128), nullable=False),
    sa.Column("plan", sa.String(16), nullable=False),  # "payg" | "monthly"
    sa.Column("plan_fee_ore", sa.BigInteger, nullable=False),
    sa.Column("discount_bp", sa.Integer, nullable=False),  # basis points: 1000 = 10 %
    sa.Column("budget_kind", sa.String(16), nullable=True),  # None | "monthly" | "prepaid"
    sa.Column("budget_nano_dkk", sa.BigInteger, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    # The operator's ceilings: per-key requests and tokens per minute, and active keys (None: no ceiling).
    sa.Column("max_rpm", sa.Integer, nullable=True),
    sa.Column("max_tpm", sa.Integer, nullable=True),
    sa.Column("max_keys", sa.Integer, nullable=True),
)

MEMBERS = sa.Table(
    "members",
    METADATA,
    sa.Column("member_id", sa.String(32), primary_key=True),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("removed_at", sa.DateTime(timezone=True), nullable=True),
)

API_KEYS = sa.Table(
    "api_keys",
    METADATA,
    sa.Column("key_id", sa.String(32), primary_key=True),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("key_hmac", sa.LargeBinary(32), nullable=False),
    # The key ends in a tag (deployments/keys.py); false for keys made before keys carried one.
    sa.Column("tagged", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float, nullable=True),
    sa.Column("name", sa.String(64), nullable=True),
    sa.Column("member_id", sa.String(32), nullable=True),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("allowed_models", sa.Text, nullable=True),  # JSON list of names and "region:<r>"; NULL: every model
    sa.Column("budget_nano_dkk", sa.BigInteger, nullable=True),  # monthly cap of this key
    sa.Column("rpm", sa.Integer, nullable=True),
    sa.Column("tpm", sa.Integer, nullable=True),
)

MODEL_PRICES = sa.Table(
    "model_prices",
    METADATA,
    sa.Column("model", sa.String(128), primary_key=True),
    sa.Column("effective_from", sa.DateTime(timezone=True), primary_key=True),
    sa.Column("input_uncached_nano_dkk", sa.BigInteger, nullable=False),
    sa.Column("input_cached_nano_dkk", sa.BigInteger, nullable=False),
    sa.Column("output_nano_dkk", sa.BigInteger, nullable=False),
)

USAGE_EVENTS = sa.Table(
    "usage_events",
    METADATA,
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
    sa.Column("cost_input_uncached_nano_dkk", sa.BigInteger, nullable=False),
    sa.Column("cost_input_cached_nano_dkk", sa.BigInteger, nullable=False),
    sa.Column("cost_output_nano_dkk", sa.BigInteger, nullable=False),
)

# Usage reports that could not be recorded (``reason``: a code such as ``unpriced_model``), kept for the operator
# to resolve: counts and ids as reported, truncated to these widths, never billed until recorded.
USAGE_SET_ASIDE = sa.Table(
    "usage_set_aside",
    METADATA,
    sa.Column("request_id", sa.String(128), primary_key=True),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("key_id", sa.String(32), nullable=False),
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("cached_tokens", sa.Integer, nullable=False),
    sa.Column("completion_tokens", sa.Integer, nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("lease_id", sa.String(64), nullable=True),
    sa.Column("reason", sa.String(32), nullable=False),
    sa.Column("set_aside_at", sa.DateTime(timezone=True), nullable=False),
)

# Running spend per budget scope ("tenant" or "key") and period ("2026-11", or "all" for prepaid credit), and the
# amount reserved by budget leases. A lease is granted with this row locked: never check-then-increment.
BUDGET_SPEND = sa.Table(
    "budget_spend",
    METADATA,
    sa.Column("scope", sa.String(8), primary_key=True),
    sa.Column("scope_id", sa.String(64), primary_key=True),
    sa.Column("period", sa.String(8), primary_key=True),
    sa.Column("spent_nano_dkk", sa.BigInteger, nullable=False),
    sa.Column("reserved_nano_dkk", sa.BigInteger, nullable=False),
)

# Budget leases: a slice of a key's budgets (its organisation's and its own) that one engine replica holds for many
# requests. ``amount_nano_dkk`` is what the lease still holds of ``reserved_nano_dkk`` in the budgets' rows of its
# periods; settlement moves costs out of it, and a lease its replica no longer renews lapses at ``expires_at``.
BUDGET_LEASES = sa.Table(
    "budget_leases",
    METADATA,
    sa.Column("lease_id", sa.String(64), primary_key=True),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("key_id", sa.String(32), nullable=False),
    sa.Column("tenant_period", sa.String(8), nullable=True),
    sa.Column("key_period", sa.String(8), nullable=True),
    sa.Column("amount_nano_dkk", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
)

AUDIT_LOG = sa.Table(
    "audit_log",
    METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("actor", sa.String(128), nullable=False),
    sa.Column("tenant", sa.String(64), nullable=True),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("target", sa.String(128), nullable=False),
    sa.Column("details", sa.Text, nullable=False),  # JSON of the changed settings; never content, never a key
)
