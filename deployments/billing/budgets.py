"""Budgets: a tenant's monthly cap or prepaid credit and a key's monthly cap, enforced by reservations.

Admission reserves a request's maximum cost with one conditional UPDATE per budget (``spent + reserved < limit``),
so concurrent requests can overspend by at most one request's maximum cost; settlement (in the ledger's insert
transaction) turns the reservation into the actual cost. Callers own the transaction; nothing here commits.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from deployments.billing.tables import API_KEYS, BUDGET_RESERVATIONS, BUDGET_SPEND, TENANTS, USAGE_EVENTS
from deployments.errors import InsufficientQuota

PREPAID_PERIOD = "all"


def month_period(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m")


def month_bounds(period: str) -> tuple[datetime, datetime]:
    """``2026-11`` -> (2026-11-01T00:00Z, 2026-12-01T00:00Z)."""
    start = datetime.strptime(period, "%Y-%m").replace(tzinfo=UTC)
    end = (start + timedelta(days=32)).replace(day=1)
    return start, end


@dataclass(frozen=True)
class Budget:
    scope: str  # "tenant" | "key"
    scope_id: str
    kind: str  # "monthly" | "prepaid"
    limit_nano_dkk: int

    def period(self, moment: datetime) -> str:
        return PREPAID_PERIOD if self.kind == "prepaid" else month_period(moment)


@dataclass(frozen=True)
class BudgetState:
    budget: Budget
    period: str
    spent_nano_dkk: int
    reserved_nano_dkk: int

    @property
    def left_nano_dkk(self) -> int:
        return self.budget.limit_nano_dkk - self.spent_nano_dkk - self.reserved_nano_dkk


def budgets_for(db: sa.Connection, tenant: str, key_id: str) -> list[Budget]:
    budgets = []
    row = db.execute(
        sa.select(TENANTS.c.budget_kind, TENANTS.c.budget_nano_dkk).where(TENANTS.c.tenant == tenant)
    ).first()
    if row is not None and row.budget_kind is not None and row.budget_nano_dkk is not None:
        budgets.append(Budget("tenant", tenant, row.budget_kind, row.budget_nano_dkk))
    key = db.execute(sa.select(API_KEYS.c.budget_nano_dkk).where(API_KEYS.c.key_id == key_id)).first()
    if key is not None and key.budget_nano_dkk is not None:
        budgets.append(Budget("key", key_id, "monthly", key.budget_nano_dkk))
    return budgets


def _ledger_spend(db: sa.Connection, budget: Budget, period: str) -> int:
    column = USAGE_EVENTS.c.tenant if budget.scope == "tenant" else USAGE_EVENTS.c.key_id
    query = sa.select(sa.func.coalesce(sa.func.sum(USAGE_EVENTS.c.cost_nano_dkk), 0)).where(column == budget.scope_id)
    if period != PREPAID_PERIOD:
        start, end = month_bounds(period)
        query = query.where(USAGE_EVENTS.c.started_at >= start, USAGE_EVENTS.c.started_at < end)
    return int(db.execute(query).scalar() or 0)


def _ensure_row(db: sa.Connection, budget: Budget, period: str) -> None:
    """The budget's running row, started from what the ledger already holds for the period (a budget set mid-month
    counts the month's earlier usage)."""
    values = {
        "scope": budget.scope,
        "scope_id": budget.scope_id,
        "period": period,
        "spent_nano_dkk": _ledger_spend(db, budget, period),
        "reserved_nano_dkk": 0,
    }
    dialect = db.dialect.name
    insert = postgresql.insert(BUDGET_SPEND) if dialect == "postgresql" else sqlite.insert(BUDGET_SPEND)
    db.execute(insert.values(**values).on_conflict_do_nothing(index_elements=["scope", "scope_id", "period"]))


def _key(budget_scope: str, scope_id: str, period: str) -> sa.ColumnElement[bool]:
    return sa.and_(
        BUDGET_SPEND.c.scope == budget_scope, BUDGET_SPEND.c.scope_id == scope_id, BUDGET_SPEND.c.period == period
    )


def state(db: sa.Connection, budget: Budget, now: datetime) -> BudgetState:
    period = budget.period(now)
    _ensure_row(db, budget, period)
    row = db.execute(sa.select(BUDGET_SPEND).where(_key(budget.scope, budget.scope_id, period))).one()
    return BudgetState(budget, period, row.spent_nano_dkk, row.reserved_nano_dkk)


def reserve(db: sa.Connection, tenant: str, key_id: str, request_id: str, amount_nano_dkk: int, now: datetime) -> bool:
    """Reserves ``amount_nano_dkk`` against every budget of the tenant and the key; False if there is none.

    Raises ``InsufficientQuota`` when a budget has nothing left; the caller's transaction then rolls back every
    reservation made here. Each budget is one atomic ``UPDATE ... WHERE spent + reserved < limit``.
    """
    budgets = budgets_for(db, tenant, key_id)
    if not budgets:
        return False
    periods: dict[str, str] = {}
    for budget in budgets:
        period = budget.period(now)
        _ensure_row(db, budget, period)
        result = db.execute(
            BUDGET_SPEND.update()
            .where(
                _key(budget.scope, budget.scope_id, period),
                BUDGET_SPEND.c.spent_nano_dkk + BUDGET_SPEND.c.reserved_nano_dkk < budget.limit_nano_dkk,
            )
            .values(reserved_nano_dkk=BUDGET_SPEND.c.reserved_nano_dkk + amount_nano_dkk)
        )
        if result.rowcount != 1:
            whose = "Your organisation's" if budget.scope == "tenant" else "This API key's"
            what = "prepaid credit" if budget.kind == "prepaid" else "monthly budget"
            raise InsufficientQuota(
                f"You exceeded your current quota: {whose} {what} is used up. Ask your organisation's admin to "
                "raise the budget or add credit."
            )
        periods[budget.scope] = period
    db.execute(
        BUDGET_RESERVATIONS.insert().values(
            request_id=request_id,
            tenant=tenant,
            key_id=key_id,
            tenant_period=periods.get("tenant"),
            key_period=periods.get("key"),
            amount_nano_dkk=amount_nano_dkk,
            created_at=now,
        )
    )
    return True


def settle(
    db: sa.Connection, request_id: str, tenant: str, key_id: str, cost_nano_dkk: int, started_at: datetime
) -> None:
    """Books a newly recorded request's cost: releases its reservation and adds the cost to the budgets' spend.

    Runs in the ledger's insert transaction, once per request (the insert is idempotent, so is this).
    """
    reservation = db.execute(
        sa.select(BUDGET_RESERVATIONS).where(BUDGET_RESERVATIONS.c.request_id == request_id)
    ).first()
    month = month_period(started_at)
    targets: list[tuple[str, str, str, int]] = []  # scope, id, period, reserved amount to release
    if reservation is not None:
        if reservation.tenant_period is not None:
            targets.append(("tenant", tenant, reservation.tenant_period, reservation.amount_nano_dkk))
        if reservation.key_period is not None:
            targets.append(("key", key_id, reservation.key_period, reservation.amount_nano_dkk))
        db.execute(BUDGET_RESERVATIONS.delete().where(BUDGET_RESERVATIONS.c.request_id == request_id))
    # Budgets that did not reserve for this request (set while it ran, or its reservation expired) still count it.
    reserved_scopes = {(scope, period) for scope, _, period, _ in targets}
    for scope, scope_id, period in (
        ("tenant", tenant, month),
        ("tenant", tenant, PREPAID_PERIOD),
        ("key", key_id, month),
    ):
        if (scope, period) not in reserved_scopes:
            targets.append((scope, scope_id, period, 0))
    for scope, scope_id, period, release in targets:
        db.execute(
            BUDGET_SPEND.update()
            .where(_key(scope, scope_id, period))
            .values(
                spent_nano_dkk=BUDGET_SPEND.c.spent_nano_dkk + cost_nano_dkk,
                reserved_nano_dkk=BUDGET_SPEND.c.reserved_nano_dkk - release,
            )
        )


def release_expired(db: sa.Connection, older_than: datetime) -> int:
    """Drops reservations of requests whose usage never arrived (an ingress lost with its outbox); returns how many.

    If the usage arrives later after all, ``settle`` still adds its cost to the spend.
    """
    rows = db.execute(sa.select(BUDGET_RESERVATIONS).where(BUDGET_RESERVATIONS.c.created_at < older_than)).all()
    for r in rows:
        for scope, scope_id, period in (("tenant", r.tenant, r.tenant_period), ("key", r.key_id, r.key_period)):
            if period is not None:
                db.execute(
                    BUDGET_SPEND.update()
                    .where(_key(scope, scope_id, period))
                    .values(reserved_nano_dkk=BUDGET_SPEND.c.reserved_nano_dkk - r.amount_nano_dkk)
                )
        db.execute(BUDGET_RESERVATIONS.delete().where(BUDGET_RESERVATIONS.c.request_id == r.request_id))
    return len(rows)


def budget_summary(db: sa.Connection, tenant: str, key_id: str, now: datetime) -> list[BudgetState]:
    return [state(db, b, now) for b in budgets_for(db, tenant, key_id)]
