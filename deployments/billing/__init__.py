"""Billing: exact pricing (``pricing``) and the usage ledger on a real database (``ledger``, Alembic migrations)."""
