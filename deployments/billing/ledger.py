"""The usage ledger on a real database: SQLite by default, PostgreSQL in production, schema by Alembic migrations.

Records usage events idempotently on ``request_id`` (an event delivered twice is billed once) at the price in effect
when the request started, and settles their costs against the budgets and the leases they drew from in the same
transaction, a batch at a time. A request cut off
after producing tokens is billed for what it produced; a failed one that produced nothing, or that was answered
with an error (``FAILED``), costs nothing. Stores counts, ids, model names, timestamps and amounts; never prompt or
completion text.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from deployments import database
from deployments.billing import budgets
from deployments.billing.pricing import TokenCounts, TokenPrices
from deployments.billing.tables import MODEL_PRICES, USAGE_EVENTS

# Statuses of a request that ran to its end.
COMPLETED = "ok"
# A request that failed on the service's side and was answered with an error (a 5xx): nothing was delivered, so
# nothing is billed, whatever the engine had produced.
FAILED = "failed"
# Cut off by the client: billed for the prompt the engine was given and the tokens it produced, even none (a client
# that leaves before the first token has still had its prompt processed, and its prefix cache warmed).
CANCELLED = "cancelled"
# Cut off by the engine failing (the client was told so, in an error event after what it got): billed for what it
# produced, and nothing if it produced nothing.
ENGINE_FAILED = "engine_unavailable"


class UnknownPrice(LookupError):
    """No price is in effect for the model at the request's start: the event cannot be billed and is not stored."""


@dataclass(frozen=True)
class UsageEvent:
    request_id: str
    tenant: str
    key_id: str
    model: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    started_at: datetime
    finished_at: datetime
    status: str

    @property
    def counts(self) -> TokenCounts:
        return TokenCounts(self.prompt_tokens, self.cached_tokens, self.completion_tokens)


@dataclass(frozen=True)
class UsageTotals:
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost_nano_dkk: int


@dataclass(frozen=True)
class Charge:
    """A request's cost split by token kind, in nano-DKK."""

    input_uncached_nano_dkk: int
    input_cached_nano_dkk: int
    output_nano_dkk: int

    @property
    def total_nano_dkk(self) -> int:
        return self.input_uncached_nano_dkk + self.input_cached_nano_dkk + self.output_nano_dkk


def charge(event: UsageEvent, prices: TokenPrices) -> Charge:
    if event.status == FAILED or (event.status == ENGINE_FAILED and event.completion_tokens == 0):
        return Charge(0, 0, 0)  # the service failed it before anything was delivered: nothing is billed
    counts = event.counts
    return Charge(
        counts.uncached_tokens * prices.input_uncached_nano_dkk,
        counts.cached_tokens * prices.input_cached_nano_dkk,
        counts.completion_tokens * prices.output_nano_dkk,
    )


@dataclass(frozen=True)
class UsageBucket:
    """Usage of one day or one model (or a whole range) for ``/v1/usage``, invoices and the dashboard."""

    start: datetime
    end: datetime
    model: str | None
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost_input_uncached_nano_dkk: int
    cost_input_cached_nano_dkk: int
    cost_output_nano_dkk: int

    @property
    def cost_nano_dkk(self) -> int:
        return self.cost_input_uncached_nano_dkk + self.cost_input_cached_nano_dkk + self.cost_output_nano_dkk


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return moment.astimezone(UTC)


def _from_db(moment: datetime) -> datetime:
    # SQLite hands timestamps back without a zone; they were stored in UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def usage_total(buckets: Sequence[UsageBucket], start: datetime, end: datetime) -> UsageBucket:
    """The sum of buckets that partition [start, end) (by day or by model): the whole range's usage."""
    return UsageBucket(
        start,
        end,
        None,
        sum(b.requests for b in buckets),
        sum(b.prompt_tokens for b in buckets),
        sum(b.cached_tokens for b in buckets),
        sum(b.completion_tokens for b in buckets),
        sum(b.cost_input_uncached_nano_dkk for b in buckets),
        sum(b.cost_input_cached_nano_dkk for b in buckets),
        sum(b.cost_output_nano_dkk for b in buckets),
    )


class Ledger:
    def __init__(self, url: str) -> None:
        self.engine = database.create_engine(url)

    def migrate(self) -> None:
        database.migrate(self.engine)

    def schema_revision(self) -> str | None:
        return database.schema_revision(self.engine)

    def set_price(self, model: str, prices: TokenPrices, effective_from: datetime) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                MODEL_PRICES.insert().values(
                    model=model,
                    effective_from=_utc(effective_from),
                    input_uncached_nano_dkk=prices.input_uncached_nano_dkk,
                    input_cached_nano_dkk=prices.input_cached_nano_dkk,
                    output_nano_dkk=prices.output_nano_dkk,
                )
            )

    def ensure_price(self, model: str, prices: TokenPrices, now: datetime) -> bool:
        """Makes ``prices`` the model's price from ``now`` on, unless it already is. True if a new price was set.

        Earlier usage keeps the amount it was billed at: costs are stored per event, prices only ever appended.
        """
        if self.price_at(model, now) == prices:
            return False
        self.set_price(model, prices, now)
        return True

    def price_at(self, model: str, moment: datetime, connection: sa.Connection | None = None) -> TokenPrices | None:
        query = (
            sa.select(MODEL_PRICES)
            .where(MODEL_PRICES.c.model == model, MODEL_PRICES.c.effective_from <= _utc(moment))
            .order_by(MODEL_PRICES.c.effective_from.desc())
            .limit(1)
        )
        if connection is None:
            with self.engine.connect() as own:
                row = own.execute(query).first()
        else:
            row = connection.execute(query).first()
        if row is None:
            return None
        return TokenPrices(row.input_uncached_nano_dkk, row.input_cached_nano_dkk, row.output_nano_dkk)

    def record(self, events: Sequence[UsageEvent]) -> int:
        """Like ``record_new``; returns how many events were new."""
        return len(self.record_new(events))

    def record_new(self, events: Sequence[UsageEvent], leases: Mapping[str, str] | None = None) -> dict[str, int]:
        """Inserts the events not yet in the ledger, in one transaction.

        Each is priced at the price in effect when it started, and its cost is settled against the budgets (and
        the budget lease named for its request id in ``leases``) in the same transaction. Replays of an event (same
        ``request_id``) change nothing, so a sender may retry until it is acknowledged. Returns the request ids that
        were new, with the nano-DKK each was billed. A few statements per batch, whatever its size: one for the
        prices, one insert, and the settlement's.
        """
        if not events:
            return {}
        leases = leases or {}
        with self.engine.begin() as connection:
            price_list = _PriceList(connection, {event.model for event in events})
            rows = []
            charges: list[tuple[UsageEvent, int]] = []
            for event in events:
                prices = price_list.at(event.model, _utc(event.started_at))
                if prices is None:
                    raise UnknownPrice(f"no price for model {event.model} at {event.started_at.isoformat()}")
                cost = charge(event, prices)
                charges.append((event, cost.total_nano_dkk))
                rows.append(
                    {
                        "request_id": event.request_id,
                        "tenant": event.tenant,
                        "key_id": event.key_id,
                        "model": event.model,
                        "prompt_tokens": event.prompt_tokens,
                        "cached_tokens": event.cached_tokens,
                        "completion_tokens": event.completion_tokens,
                        "cost_nano_dkk": cost.total_nano_dkk,
                        "cost_input_uncached_nano_dkk": cost.input_uncached_nano_dkk,
                        "cost_input_cached_nano_dkk": cost.input_cached_nano_dkk,
                        "cost_output_nano_dkk": cost.output_nano_dkk,
                        "started_at": _utc(event.started_at),
                        "finished_at": _utc(event.finished_at),
                        "status": event.status,
                    }
                )
            insert = _insert_ignoring_duplicates(self.engine.dialect.name)
            result = connection.execute(insert.returning(USAGE_EVENTS.c.request_id), rows)
            inserted = {r[0] for r in result.fetchall()}
            new: dict[str, int] = {}
            settlements = []
            for event, cost_nano in charges:
                if event.request_id in inserted and event.request_id not in new:  # once, even if a batch repeats
                    new[event.request_id] = cost_nano
                    settlements.append(
                        budgets.Settlement(
                            leases.get(event.request_id), event.tenant, event.key_id, cost_nano, _utc(event.started_at)
                        )
                    )
            budgets.settle(connection, settlements)
            return new

    def totals(self, tenant: str, start: datetime, end: datetime, model: str | None = None) -> UsageTotals:
        conditions = [
            USAGE_EVENTS.c.tenant == tenant,
            USAGE_EVENTS.c.started_at >= _utc(start),
            USAGE_EVENTS.c.started_at < _utc(end),
        ]
        if model is not None:
            conditions.append(USAGE_EVENTS.c.model == model)
        query = sa.select(
            sa.func.count(),
            sa.func.coalesce(sa.func.sum(USAGE_EVENTS.c.prompt_tokens), 0),
            sa.func.coalesce(sa.func.sum(USAGE_EVENTS.c.cached_tokens), 0),
            sa.func.coalesce(sa.func.sum(USAGE_EVENTS.c.completion_tokens), 0),
            sa.func.coalesce(sa.func.sum(USAGE_EVENTS.c.cost_nano_dkk), 0),
        ).where(*conditions)
        with self.engine.connect() as connection:
            row = connection.execute(query).one()
        return UsageTotals(*(int(v) for v in row))

    def usage(
        self,
        tenant: str,
        start: datetime,
        end: datetime,
        group_by: str | None = None,
        key_id: str | None = None,
    ) -> list[UsageBucket]:
        """Usage of ``tenant`` (or only of ``key_id``) in [start, end), whole, per UTC ``day`` or per ``model``."""
        start, end = _utc(start), _utc(end)
        conditions = [
            USAGE_EVENTS.c.tenant == tenant,
            USAGE_EVENTS.c.started_at >= start,
            USAGE_EVENTS.c.started_at < end,
        ]
        if key_id is not None:
            conditions.append(USAGE_EVENTS.c.key_id == key_id)
        sums = [
            sa.func.count(),
            sa.func.coalesce(sa.func.sum(USAGE_EVENTS.c.prompt_tokens), 0),
            sa.func.coalesce(sa.func.sum(USAGE_EVENTS.c.cached_tokens), 0),
            sa.func.coalesce(sa.func.sum(USAGE_EVENTS.c.completion_tokens), 0),
            sa.func.coalesce(sa.func.sum(USAGE_EVENTS.c.cost_input_uncached_nano_dkk), 0),
            sa.func.coalesce(sa.func.sum(USAGE_EVENTS.c.cost_input_cached_nano_dkk), 0),
            sa.func.coalesce(sa.func.sum(USAGE_EVENTS.c.cost_output_nano_dkk), 0),
        ]
        group: sa.ColumnElement[str] | None = None
        if group_by == "day":
            group = _day(self.engine.dialect.name)
        elif group_by == "model":
            group = USAGE_EVENTS.c.model
        elif group_by is not None:
            raise ValueError("group_by must be day or model")
        query = sa.select(*([group] if group is not None else []), *sums).where(*conditions)
        if group is not None:
            query = query.group_by(group).order_by(group)
        with self.engine.connect() as connection:
            rows = connection.execute(query).all()
        buckets = []
        for row in rows:
            values = [int(v) for v in (row[1:] if group is not None else row)]
            if group_by is not None and values[0] == 0:
                continue
            bucket_start, bucket_end, model = start, end, None
            if group_by == "day":
                bucket_start = datetime.strptime(str(row[0]), "%Y-%m-%d").replace(tzinfo=UTC)
                bucket_end = bucket_start + timedelta(days=1)
            elif group_by == "model":
                model = str(row[0])
            buckets.append(UsageBucket(bucket_start, bucket_end, model, *values))
        return buckets

    def request_ids(self, tenant: str) -> list[str]:
        with self.engine.connect() as connection:
            rows = connection.execute(sa.select(USAGE_EVENTS.c.request_id).where(USAGE_EVENTS.c.tenant == tenant)).all()
        return sorted(r[0] for r in rows)

    def events(self, tenant: str) -> Iterable[dict[str, object]]:
        with self.engine.connect() as connection:
            for row in connection.execute(sa.select(USAGE_EVENTS).where(USAGE_EVENTS.c.tenant == tenant)):
                record = dict(row._mapping)
                record["started_at"] = _from_db(record["started_at"])
                record["finished_at"] = _from_db(record["finished_at"])
                yield record

    def dispose(self) -> None:
        self.engine.dispose()


class _PriceList:
    """The price history of some models, read in one query: the price in effect at any moment, without a query
    per event (prices are only ever appended)."""

    def __init__(self, connection: sa.Connection, models: set[str]) -> None:
        self._history: dict[str, tuple[list[datetime], list[TokenPrices]]] = {}
        query = (
            sa.select(MODEL_PRICES)
            .where(MODEL_PRICES.c.model.in_(sorted(models)))
            .order_by(MODEL_PRICES.c.model, MODEL_PRICES.c.effective_from)
        )
        for row in connection.execute(query):
            moments, prices = self._history.setdefault(row.model, ([], []))
            moments.append(_utc(_from_db(row.effective_from)))
            prices.append(TokenPrices(row.input_uncached_nano_dkk, row.input_cached_nano_dkk, row.output_nano_dkk))

    def at(self, model: str, moment: datetime) -> TokenPrices | None:
        moments, prices = self._history.get(model, ([], []))
        index = bisect.bisect_right(moments, moment) - 1
        return prices[index] if index >= 0 else None


def _day(dialect: str) -> sa.ColumnElement[str]:
    """The UTC calendar day of ``started_at`` as ``YYYY-MM-DD`` (stored in UTC by both databases)."""
    if dialect == "postgresql":
        return sa.func.to_char(sa.func.timezone("UTC", USAGE_EVENTS.c.started_at), "YYYY-MM-DD")
    return sa.func.substr(sa.cast(USAGE_EVENTS.c.started_at, sa.String), 1, 10)


def _insert_ignoring_duplicates(dialect: str) -> sa.Insert:
    if dialect == "postgresql":
        return postgresql.insert(USAGE_EVENTS).on_conflict_do_nothing(index_elements=["request_id"])
    if dialect == "sqlite":
        return sqlite.insert(USAGE_EVENTS).on_conflict_do_nothing(index_elements=["request_id"])
    raise ValueError(f"the ledger supports SQLite and PostgreSQL, not {dialect}")
