"""The usage ledger on a real database: SQLite by default, PostgreSQL in production, schema by Alembic migrations.

Records usage events idempotently on ``request_id`` (an event delivered twice is billed once) at the price in effect
when the request started. Stores counts, ids, model names, timestamps and amounts; never prompt or completion text.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from deployments import database
from deployments.billing.pricing import TokenCounts, TokenPrices, cost_nano_dkk

METADATA = sa.MetaData()
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
)


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


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return moment.astimezone(UTC)


def _from_db(moment: datetime) -> datetime:
    # SQLite hands timestamps back without a zone; they were stored in UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


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
        """Inserts the events not yet in the ledger, in one transaction; returns how many were new.

        Each is priced at the price in effect when it started. Replays of an event (same ``request_id``) change
        nothing, so a sender may retry until it is acknowledged.
        """
        if not events:
            return 0
        with self.engine.begin() as connection:
            rows = []
            for event in events:
                prices = self.price_at(event.model, event.started_at, connection)
                if prices is None:
                    raise UnknownPrice(f"no price for model {event.model} at {event.started_at.isoformat()}")
                rows.append(
                    {
                        "request_id": event.request_id,
                        "tenant": event.tenant,
                        "key_id": event.key_id,
                        "model": event.model,
                        "prompt_tokens": event.prompt_tokens,
                        "cached_tokens": event.cached_tokens,
                        "completion_tokens": event.completion_tokens,
                        "cost_nano_dkk": cost_nano_dkk(event.counts, prices),
                        "started_at": _utc(event.started_at),
                        "finished_at": _utc(event.finished_at),
                        "status": event.status,
                    }
                )
            insert = _insert_ignoring_duplicates(self.engine.dialect.name)
            result = connection.execute(insert.returning(USAGE_EVENTS.c.request_id), rows)
            return len(result.fetchall())

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


def _insert_ignoring_duplicates(dialect: str) -> sa.Insert:
    if dialect == "postgresql":
        return postgresql.insert(USAGE_EVENTS).on_conflict_do_nothing(index_elements=["request_id"])
    if dialect == "sqlite":
        return sqlite.insert(USAGE_EVENTS).on_conflict_do_nothing(index_elements=["request_id"])
    raise ValueError(f"the ledger supports SQLite and PostgreSQL, not {dialect}")
