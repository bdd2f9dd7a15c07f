"""Budgets: a tenant's monthly cap or prepaid credit and a key's monthly cap, enforced by leases.

An engine replica holds a lease on a key's budgets: an amount reserved in each of them (``reserved`` of their
``budget_spend`` rows), granted with those rows locked, from which it admits many requests, each drawing its maximum
cost. Settlement (in the ledger's insert transaction, once per batch) moves each request's actual cost from its
lease's reservation to the budgets' spend. A lease its replica stops renewing lapses, and what it still held is
released, never spent.

The bound: a lease is granted only within what a budget has left, except for the budget's last request, which may
draw its maximum cost while anything at all is left (``spent + reserved < limit``), as a single reservation would:
a budget is overspent by at most one request's maximum cost. Callers own the transaction; nothing here commits.
"""

from __future__ import annotations

import math
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from deployments.billing.tables import API_KEYS, BUDGET_LEASES, BUDGET_SPEND, TENANTS, USAGE_EVENTS
from deployments.errors import InsufficientQuota

PREPAID_PERIOD = "all"
# A lease takes at most this share of what a budget has left (but always what the waiting request needs), so that
# other keys and replicas find room too, and near the limit leases shrink to one request at a time.
LEASE_SHARE = 0.25


def month_period(moment: datetime) -> str:
    utc = moment.astimezone(UTC)
    return f"{utc.year:04d}-{utc.month:02d}"  # strftime's "%Y-%m", at a third of its cost (once per usage event)


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


def _refusal(budget: Budget) -> InsufficientQuota:
    whose = "Your organisation's" if budget.scope == "tenant" else "This API key's"
    what = "prepaid credit" if budget.kind == "prepaid" else "monthly budget"
    return InsufficientQuota(
        f"You exceeded your current quota: {whose} {what} is used up. Ask your organisation's admin to raise the "
        "budget or add credit."
    )


@dataclass(frozen=True)
class LeaseGrant:
    lease_id: str
    amount_nano_dkk: int  # added to the lease now


def grant_lease(
    db: sa.Connection,
    tenant: str,
    key_id: str,
    lease_id: str | None,
    need_nano_dkk: int,
    want_nano_dkk: int,
    now: datetime,
    ttl_s: float,
) -> LeaseGrant | None:
    """Adds to the key's lease ``lease_id`` (or a new one): at least ``need_nano_dkk``, up to ``want_nano_dkk`` and
    a share of what the tightest budget has left. None if no budget applies to the key.

    Raises ``InsufficientQuota`` when a budget cannot cover ``need_nano_dkk``, unless it is the budget's last
    request (see the module's bound). The budgets' rows are locked while they are read and raised (``FOR UPDATE`` on
    PostgreSQL, in ``_lock_spend``'s order; SQLite's write transactions are exclusive), so concurrent grants never
    both take the same room.
    """
    budgets = budgets_for(db, tenant, key_id)
    if not budgets:
        return None
    for budget in budgets:
        _ensure_row(db, budget, budget.period(now))
    locked = _lock_spend(db, {(budget.scope, budget.scope_id, budget.period(now)) for budget in budgets})
    rows = []
    for budget in budgets:
        period = budget.period(now)
        row = locked[(budget.scope, budget.scope_id, period)]
        rows.append((budget, period, row.spent_nano_dkk + row.reserved_nano_dkk))
    room = min(budget.limit_nano_dkk - used for budget, _, used in rows)
    if room >= need_nano_dkk:
        amount = max(need_nano_dkk, min(want_nano_dkk, math.floor(room * LEASE_SHARE)))
    else:
        for budget, _, used in rows:
            if used >= budget.limit_nano_dkk:
                raise _refusal(budget)
        amount = need_nano_dkk  # the budget's last request
    periods = {budget.scope: period for budget, period, _ in rows}
    for budget, period, _ in rows:
        db.execute(
            BUDGET_SPEND.update()
            .where(_key(budget.scope, budget.scope_id, period))
            .values(reserved_nano_dkk=BUDGET_SPEND.c.reserved_nano_dkk + amount)
        )
    expires_at = now + timedelta(seconds=ttl_s)
    if lease_id is not None:
        topped_up = db.execute(
            BUDGET_LEASES.update()
            .where(
                BUDGET_LEASES.c.lease_id == lease_id,
                BUDGET_LEASES.c.key_id == key_id,
                _same(BUDGET_LEASES.c.tenant_period, periods.get("tenant")),
                _same(BUDGET_LEASES.c.key_period, periods.get("key")),
            )
            .values(amount_nano_dkk=BUDGET_LEASES.c.amount_nano_dkk + amount, expires_at=expires_at)
        )
        if topped_up.rowcount == 1:
            return LeaseGrant(lease_id, amount)
    # No lease yet, or the one held lapsed or belongs to another month: a new one.
    new_id = f"lease-{uuid.uuid4().hex}"
    db.execute(
        BUDGET_LEASES.insert().values(
            lease_id=new_id,
            tenant=tenant,
            key_id=key_id,
            tenant_period=periods.get("tenant"),
            key_period=periods.get("key"),
            amount_nano_dkk=amount,
            created_at=now,
            expires_at=expires_at,
        )
    )
    return LeaseGrant(new_id, amount)


def _same(column: sa.Column[str | None], period: str | None) -> sa.ColumnElement[bool]:
    return column.is_(None) if period is None else column == period


@dataclass(frozen=True)
class Settlement:
    """What newly recorded requests of one key cost, summed per month they started in (``month_period``) and lease
    they drew from (None: no budget applied when they started)."""

    lease_id: str | None
    tenant: str
    key_id: str
    month: str
    cost_nano_dkk: int


SpendKey = tuple[str, str, str]  # scope, scope id, period


def settle(db: sa.Connection, settlements: Sequence[Settlement]) -> None:
    """Books a batch of newly recorded requests' costs (summed, ``Settlement``): each lease gives up what its
    requests cost (never more than it holds; a lease that lapsed holds nothing), and every budget row of the
    requests' month, and the prepaid one, adds the cost to its spend, budgets set while a request ran included.

    One statement per lease and one per budget row, however many requests the batch holds. Runs in the ledger's
    insert transaction, for the requests that insert added (the insert is idempotent, so is this).
    """
    if not settlements:
        return
    spent: dict[SpendKey, int] = defaultdict(int)
    released: dict[SpendKey, int] = defaultdict(int)
    by_lease: dict[str, int] = defaultdict(int)
    for s in settlements:
        month = s.month
        for target in (("tenant", s.tenant, month), ("tenant", s.tenant, PREPAID_PERIOD), ("key", s.key_id, month)):
            spent[target] += s.cost_nano_dkk
        if s.lease_id is not None:
            by_lease[s.lease_id] += s.cost_nano_dkk
    of_leases = BUDGET_LEASES.c.lease_id.in_(sorted(by_lease))
    # Budget rows first, then leases, as every writer takes them (``_lock_spend``); a lease's rows never change.
    seen = db.execute(sa.select(BUDGET_LEASES).where(of_leases)).all() if by_lease else []
    _lock_spend(db, set(spent) | {target for lease in seen for target in _lease_rows(lease)})
    if by_lease:
        for lease in db.execute(
            sa.select(BUDGET_LEASES).where(of_leases).order_by(BUDGET_LEASES.c.lease_id).with_for_update()
        ):  # a lease released or lapsed meanwhile is not here: what it held is back in the budgets already
            release = min(by_lease[lease.lease_id], lease.amount_nano_dkk)
            if release == 0:
                continue
            db.execute(
                BUDGET_LEASES.update()
                .where(BUDGET_LEASES.c.lease_id == lease.lease_id)
                .values(amount_nano_dkk=BUDGET_LEASES.c.amount_nano_dkk - release)
            )
            for target in _lease_rows(lease):
                released[target] += release
    _apply(db, spent, released)


def _lease_rows(lease: sa.Row[Any]) -> list[SpendKey]:
    rows = []
    if lease.tenant_period is not None:
        rows.append(("tenant", lease.tenant, lease.tenant_period))
    if lease.key_period is not None:
        rows.append(("key", lease.key_id, lease.key_period))
    return rows


def _lock_spend(db: sa.Connection, targets: set[SpendKey]) -> dict[SpendKey, Any]:
    """Locks budget rows (those that exist) in one statement, in the database's order of their keys, and returns
    them. Every transaction that writes budget rows and leases locks its budget rows so first, then its leases: so
    a grant, a settlement and a release never wait for each other in a circle (PostgreSQL would break the circle
    by failing one of them). SQLite's write transactions are exclusive: there this is a plain read."""
    if not targets:
        return {}
    key = sa.tuple_(BUDGET_SPEND.c.scope, BUDGET_SPEND.c.scope_id, BUDGET_SPEND.c.period)
    rows = db.execute(
        sa.select(BUDGET_SPEND)
        .where(key.in_(sorted(targets)))
        .order_by(BUDGET_SPEND.c.scope, BUDGET_SPEND.c.scope_id, BUDGET_SPEND.c.period)
        .with_for_update()
    ).all()
    return {(row.scope, row.scope_id, row.period): row for row in rows}


def _apply(db: sa.Connection, spent: dict[SpendKey, int], released: dict[SpendKey, int]) -> None:
    """One UPDATE of every budget row touched, in one round trip (rows that do not exist are no budget)."""
    targets = sorted(set(spent) | set(released))
    if not targets:
        return
    statement = (
        BUDGET_SPEND.update()
        .where(
            BUDGET_SPEND.c.scope == sa.bindparam("t_scope"),
            BUDGET_SPEND.c.scope_id == sa.bindparam("t_scope_id"),
            BUDGET_SPEND.c.period == sa.bindparam("t_period"),
        )
        .values(
            spent_nano_dkk=BUDGET_SPEND.c.spent_nano_dkk + sa.bindparam("t_spent"),
            reserved_nano_dkk=BUDGET_SPEND.c.reserved_nano_dkk - sa.bindparam("t_released"),
        )
    )
    db.execute(
        statement,
        [
            {
                "t_scope": scope,
                "t_scope_id": scope_id,
                "t_period": period,
                "t_spent": spent.get((scope, scope_id, period), 0),
                "t_released": released.get((scope, scope_id, period), 0),
            }
            for scope, scope_id, period in targets
        ],
    )


def _release(db: sa.Connection, condition: sa.ColumnElement[bool]) -> list[str]:
    """Deletes the leases that meet ``condition`` and gives what they held back to their budgets."""
    seen = db.execute(sa.select(BUDGET_LEASES).where(condition)).all()
    if not seen:
        return []
    _lock_spend(db, {target for lease in seen for target in _lease_rows(lease)})  # before the leases, as all do
    rows = db.execute(BUDGET_LEASES.delete().where(condition).returning(*BUDGET_LEASES.c)).all()
    released: dict[SpendKey, int] = defaultdict(int)
    for lease in rows:
        for target in _lease_rows(lease):
            released[target] += lease.amount_nano_dkk
    _apply(db, {}, {k: v for k, v in released.items() if v})
    return [lease.lease_id for lease in rows]


def release_leases(db: sa.Connection, lease_ids: Sequence[str]) -> list[str]:
    """Gives back leases their replica no longer needs (every report of theirs was recorded); returns those found."""
    if not lease_ids:
        return []
    return _release(db, BUDGET_LEASES.c.lease_id.in_(sorted(lease_ids)))


def release_expired(db: sa.Connection, now: datetime) -> int:
    """Releases leases no replica renewed in time (a replica that died or lost billing); returns how many.

    What a lapsed lease held goes back to its budgets; a request of it whose usage arrives later still adds its cost
    to the spend, so it is billed, and never counted twice.
    """
    return len(_release(db, BUDGET_LEASES.c.expires_at < now))


def renew_leases(db: sa.Connection, lease_ids: Sequence[str], expires_at: datetime) -> list[str]:
    """Keeps leases in use alive until ``expires_at``; returns those still held (a lapsed one is gone)."""
    if not lease_ids:
        return []
    result = db.execute(
        BUDGET_LEASES.update()
        .where(BUDGET_LEASES.c.lease_id.in_(sorted(lease_ids)))
        .values(expires_at=expires_at)
        .returning(BUDGET_LEASES.c.lease_id)
    )
    return [row[0] for row in result]


def budget_summary(db: sa.Connection, tenant: str, key_id: str, now: datetime) -> list[BudgetState]:
    return [state(db, b, now) for b in budgets_for(db, tenant, key_id)]
