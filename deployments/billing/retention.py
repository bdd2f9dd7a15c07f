"""Retention: rows older than the retention period are deleted, as the record of processing says.

The period is ``billing.retention_months`` counted back from the start of the current month (UTC), then back to the
start of that calendar year: a financial year's rows go together, on the first day of the year after their last
one's period ended. With 60 months, rows of 2021 are kept until 31 December 2026, which is what the Danish
bookkeeping act (bogføringsloven) asks for: 5 years from the end of the financial year (a calendar one here).

What goes, and what stays:

- usage events, audit-log entries and monthly budget spend of months before the cutoff;
- prices that stopped applying before the cutoff (the price in force at the cutoff stays);
- API keys revoked before the cutoff, and members removed before it, once no remaining row names them.

Organisations stay while they are customers (their rows are the account, not the ledger). The billing actor runs
this once a day (``deployments/billing/actor.py``); it is idempotent.
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa

from deployments.billing.tables import (
    API_KEYS,
    AUDIT_LOG,
    BUDGET_SPEND,
    MEMBERS,
    MODEL_PRICES,
    USAGE_EVENTS,
    USAGE_SET_ASIDE,
)


def retention_cutoff(now: datetime, months: int) -> datetime:
    """The first instant that is kept: the start of the year of the month ``months`` months before ``now``'s."""
    if months < 1:
        raise ValueError("retention must be at least one month")
    utc = now.astimezone(UTC)
    year = (utc.year * 12 + utc.month - 1 - months) // 12
    return datetime(year, 1, 1, tzinfo=UTC)


def purge(connection: sa.Connection, cutoff: datetime) -> dict[str, int]:
    """Deletes what is older than ``cutoff`` (in one transaction: the caller's); rows deleted per table."""
    later_price = MODEL_PRICES.alias("later_price")
    deletes = {
        "usage_events": sa.delete(USAGE_EVENTS).where(USAGE_EVENTS.c.finished_at < cutoff),
        "usage_set_aside": sa.delete(USAGE_SET_ASIDE).where(USAGE_SET_ASIDE.c.finished_at < cutoff),
        "audit_log": sa.delete(AUDIT_LOG).where(AUDIT_LOG.c.at < cutoff),
        "budget_spend": sa.delete(BUDGET_SPEND).where(
            BUDGET_SPEND.c.period != "all", BUDGET_SPEND.c.period < cutoff.strftime("%Y-%m")
        ),
        "model_prices": sa.delete(MODEL_PRICES).where(
            MODEL_PRICES.c.effective_from < cutoff,
            sa.exists().where(
                later_price.c.model == MODEL_PRICES.c.model,
                later_price.c.effective_from > MODEL_PRICES.c.effective_from,
                later_price.c.effective_from <= cutoff,
            ),
        ),
        # After the usage events: a key goes once no event names it, a member once no key does.
        "api_keys": sa.delete(API_KEYS).where(
            API_KEYS.c.revoked_at < cutoff.timestamp(),
            ~sa.exists().where(USAGE_EVENTS.c.key_id == API_KEYS.c.key_id),
        ),
        "members": sa.delete(MEMBERS).where(
            MEMBERS.c.removed_at < cutoff,
            ~sa.exists().where(API_KEYS.c.member_id == MEMBERS.c.member_id),
        ),
    }
    return {table: connection.execute(statement).rowcount for table, statement in deletes.items()}
