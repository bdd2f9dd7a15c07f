"""Alembic environment for the usage ledger: runs migrations on the connection that ``ledger.migrate`` hands in."""

from __future__ import annotations

from alembic import context

from deployments.billing.ledger import METADATA

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=METADATA, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
