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
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from deployments import database
from deployments.billing import budgets
from deployments.billing.pricing import TokenCounts, TokenPrices
from deployments.billing.tables import MODEL_PRICES, USAGE_EVENTS, USAGE_SET_ASIDE

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


# Why a usage report was set aside rather than recorded (``usage_set_aside.reason``): codes, never a message.
UNPRICED = "unpriced_model"  # no price was in effect for its model when it started
INVALID_COUNTS = "invalid_counts"  # negative counts, or more cached tokens than prompt tokens
INVALID_IDS = "invalid_ids"  # an id or name wider than the ledger's column, or a status it does not know
REFUSED_BY_DATABASE = "refused_by_database"  # the database refused the row for a reason not checked above
STATUSES = frozenset({COMPLETED, FAILED, CANCELLED, ENGINE_FAILED})
RETRIED = frozenset({UNPRICED, REFUSED_BY_DATABASE})  # what ``record_set_aside`` tries again


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
class Recorded:
    """What ``record_new`` did with a batch: the events new in the ledger (request id: nano-DKK billed) and the
    events newly set aside (request id: reason). Every other event of the batch was there already."""

    new: dict[str, int]
    set_aside: dict[str, str]


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
        """Like ``record_new``; returns how many events were new in the ledger."""
        return len(self.record_new(events).new)

    def record_new(self, events: Sequence[UsageEvent], leases: Mapping[str, str] | None = None) -> Recorded:
        """Inserts the events not yet in the ledger, in one transaction, and sets aside those it cannot record.

        Each is priced at the price in effect when it started, and its cost is settled against the budgets (and
        the budget lease named for its request id in ``leases``) in the same transaction. Replays of an event (same
        ``request_id``) change nothing, so a sender may retry until it is acknowledged. An event that cannot be
        recorded (its model has no price then, its counts are impossible, the database refuses it) is set aside
        with its reason instead (``usage_set_aside``), unbilled, and the rest is recorded: one bad report must never
        hold back a sender's others. A few statements per batch, whatever its size: one for the prices, one
        insert, and the settlement's.
        """
        if not events:
            return Recorded({}, {})
        leases = leases or {}
        with self.engine.begin() as connection:
            price_list = _PriceList(connection, {event.model for event in events})
            rows: list[tuple[Any, ...]] = []  # in ``_USAGE_COLUMNS``' order
            charges: dict[str, tuple[UsageEvent, int, str]] = {}  # request id: event, nano-DKK, month
            refused: dict[str, tuple[UsageEvent, str]] = {}
            for event in events:
                request_id = event.request_id
                if request_id in charges or request_id in refused:
                    continue  # a repeat within the batch: the first counts
                started = _utc(event.started_at)
                priced = _priced(event, started, price_list)
                if isinstance(priced, str):
                    refused[request_id] = (event, priced)
                    continue
                charges[request_id] = (event, priced.total_nano_dkk, budgets.month_period(started))
                rows.append(_usage_row(event, priced, started))
            inserted = self._insert(connection, rows, charges, refused)
            new: dict[str, int] = {}
            owed: dict[tuple[str | None, str, str, str], int] = {}  # (lease, tenant, key, month): nano-DKK
            for request_id, (event, cost_nano, month) in charges.items():
                if request_id in inserted:
                    new[request_id] = cost_nano
                    if cost_nano:
                        owing = (leases.get(request_id), event.tenant, event.key_id, month)
                        owed[owing] = owed.get(owing, 0) + cost_nano
            budgets.settle(connection, [budgets.Settlement(*owing, cost) for owing, cost in owed.items()])
            return Recorded(new, _set_aside(connection, refused, leases))

    def _insert(
        self,
        connection: sa.Connection,
        rows: list[tuple[Any, ...]],
        charges: Mapping[str, tuple[UsageEvent, int, str]],
        refused: dict[str, tuple[UsageEvent, str]],
    ) -> set[str]:
        """Inserts ``rows`` that are not in the ledger yet (one statement); the request ids inserted. If the database
        refuses the batch, each row is tried on its own and those it refuses go to ``refused``."""
        if not rows:
            return set()
        dialect = self.engine.dialect.name
        try:
            with connection.begin_nested():
                if dialect == "postgresql":
                    batch = json.dumps([_json_row(row) for row in rows], separators=(",", ":"))
                    return {r[0] for r in connection.execute(_JSONB_INSERT, {"_rows": batch}).fetchall()}
                return _sqlite_insert(connection, rows)
        except (sa.exc.IntegrityError, sa.exc.DataError, OverflowError):  # (SQLite's driver: past 64 bits)
            pass
        insert = _insert_ignoring_duplicates(USAGE_EVENTS, dialect).returning(USAGE_EVENTS.c.request_id)
        inserted: set[str] = set()
        for row in rows:
            request_id = row[0]
            try:
                with connection.begin_nested():
                    parameters = dict(zip(_USAGE_COLUMNS, row, strict=True))
                    inserted.update(r[0] for r in connection.execute(insert, [parameters]).fetchall())
            except (sa.exc.IntegrityError, sa.exc.DataError, OverflowError):
                refused[request_id] = (charges[request_id][0], REFUSED_BY_DATABASE)
        return inserted

    def record_set_aside(self) -> Recorded:
        """Records again what was set aside (once the operator has fixed its cause: a price set from the request's
        start, say); what is now in the ledger leaves ``usage_set_aside``, the rest stays. Settled against the
        budgets without a lease: the lease it was admitted from is long given back. Impossible counts and ids are
        not tried again: they are kept as reported (cut to the columns), and a fix of them is the operator's.

        A model served before its first price was set (billing learns prices from the config when it starts) gets
        that first price from its earliest request set aside: its price history then starts when it was served."""
        rows = [r for r in self.set_aside() if r["reason"] in RETRIED]
        self._price_from_first_use(rows)
        events = [
            UsageEvent(
                str(r["request_id"]),
                str(r["tenant"]),
                str(r["key_id"]),
                str(r["model"]),
                int(r["prompt_tokens"]),  # type: ignore[call-overload]
                int(r["cached_tokens"]),  # type: ignore[call-overload]
                int(r["completion_tokens"]),  # type: ignore[call-overload]
                _from_db(r["started_at"]),  # type: ignore[arg-type]
                _from_db(r["finished_at"]),  # type: ignore[arg-type]
                str(r["status"]),
            )
            for r in rows
        ]
        recorded = self.record_new(events)
        with self.engine.begin() as connection:
            in_ledger = sa.select(USAGE_EVENTS.c.request_id).where(
                USAGE_EVENTS.c.request_id == USAGE_SET_ASIDE.c.request_id
            )
            connection.execute(sa.delete(USAGE_SET_ASIDE).where(sa.exists(in_ledger)))
        return recorded

    def _price_from_first_use(self, rows: list[dict[str, object]]) -> None:
        first_use: dict[str, datetime] = {}
        for r in rows:
            if r["reason"] == UNPRICED:
                started = _from_db(r["started_at"])  # type: ignore[arg-type]
                first_use[str(r["model"])] = min(started, first_use.get(str(r["model"]), started))
        with self.engine.begin() as connection:
            for model, started in first_use.items():
                first = connection.execute(
                    sa.select(MODEL_PRICES).where(MODEL_PRICES.c.model == model).order_by(MODEL_PRICES.c.effective_from)
                ).first()
                if first is not None and _utc(_from_db(first.effective_from)) > started:
                    connection.execute(
                        MODEL_PRICES.insert().values(
                            model=model,
                            effective_from=started,
                            input_uncached_nano_dkk=first.input_uncached_nano_dkk,
                            input_cached_nano_dkk=first.input_cached_nano_dkk,
                            output_nano_dkk=first.output_nano_dkk,
                        )
                    )

    def set_aside(self) -> list[dict[str, object]]:
        """The usage reports set aside, oldest first: counts, ids and reasons, for the operator."""
        with self.engine.connect() as connection:
            query = sa.select(USAGE_SET_ASIDE).order_by(USAGE_SET_ASIDE.c.set_aside_at, USAGE_SET_ASIDE.c.request_id)
            return [dict(row._mapping) for row in connection.execute(query)]

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


def _insert_ignoring_duplicates(table: sa.Table, dialect: str) -> sa.Insert:
    if dialect == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing(index_elements=["request_id"])
    if dialect == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing(index_elements=["request_id"])
    raise ValueError(f"the ledger supports SQLite and PostgreSQL, not {dialect}")


# A usage row's columns, in the order ``_usage_row`` gives their values (the inserts name each one): its times last.
_USAGE_COLUMNS = (
    "request_id",
    "tenant",
    "key_id",
    "model",
    "status",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "cost_nano_dkk",
    "cost_input_uncached_nano_dkk",
    "cost_input_cached_nano_dkk",
    "cost_output_nano_dkk",
    "started_at",
    "finished_at",
)


def _jsonb_insert() -> sa.Insert:
    """A batch of usage rows into PostgreSQL as one JSON array of rows (``_rows``), each taken apart on the server
    (``jsonb_array_elements``, then ``->>`` and a cast to the column's type): one short statement whatever the
    batch's size, planned once, and nothing done per value in Python but ``json.dumps``. Two earlier ways were
    measured: a parameter set per row made a statement of 14 parameters a row, parsed anew for every batch; an
    array per column (``unnest``) spent 40 % of billing's writing time in psycopg's Python array dumper."""
    rows = sa.func.jsonb_array_elements(sa.cast(sa.bindparam("_rows", type_=sa.Text), postgresql.JSONB)).alias("r")
    row = sa.literal_column("r.value", type_=postgresql.JSONB)
    values = []
    for i, name in enumerate(_USAGE_COLUMNS):
        column = USAGE_EVENTS.c[name]
        text = row.op("->>")(sa.literal_column(str(i)))
        # Text as it is, not cast to the column's VARCHAR(n): that cast would cut a longer value silently, where the
        # insert refuses it.
        values.append(text if isinstance(column.type, sa.String) else sa.cast(text, column.type))
    return (
        postgresql.insert(USAGE_EVENTS)
        .from_select(list(_USAGE_COLUMNS), sa.select(*values).select_from(rows))
        .on_conflict_do_nothing(index_elements=["request_id"])
        .returning(USAGE_EVENTS.c.request_id)
    )


_JSONB_INSERT = _jsonb_insert()


# SQLite: a plain insert, run once per row by the driver (``executemany``); ``_sqlite_insert`` says which are new.
_SQLITE_INSERT = (
    f"INSERT INTO {USAGE_EVENTS.name} ({', '.join(_USAGE_COLUMNS)}) VALUES ({', '.join('?' * len(_USAGE_COLUMNS))})"
)
_SQLITE_IN_CHUNK = 500  # ids per look-up (older SQLite builds take at most 999 parameters a statement)


def _sqlite_insert(connection: sa.Connection, rows: list[tuple[Any, ...]]) -> set[str]:
    """SQLite's batch insert: the rows whose request ids the ledger does not hold yet, handed to the driver's
    ``executemany`` as they are (no statement built per batch, no per-value work in SQLAlchemy); returns their ids.

    Which rows are new is looked up first, in the same transaction. That is exact: every SQLite transaction here
    holds the write lock from its start (``BEGIN IMMEDIATE``, deployments/database.py), so no row can appear in
    between; and if one did, the plain insert would fail and the batch would go row by row. An insert that returns
    its ids (``RETURNING``) needs a statement that SQLite runs per row anew; measured here: 15 µs an event against
    9 µs for the driver's loop."""
    ids = [row[0] for row in rows]
    there: set[str] = set()
    for start in range(0, len(ids), _SQLITE_IN_CHUNK):
        chunk = ids[start : start + _SQLITE_IN_CHUNK]
        query = sa.select(USAGE_EVENTS.c.request_id).where(USAGE_EVENTS.c.request_id.in_(chunk))
        there.update(connection.execute(query).scalars())
    new = [_sqlite_row(row) for row in rows if row[0] not in there]
    if new:
        connection.exec_driver_sql(_SQLITE_INSERT, new)
    return {row[0] for row in new}


_IDS = ("request_id", "tenant", "key_id", "model")


def _width(table: sa.Table, column: str) -> int:
    """The width of a text column, as the table defines it."""
    kind = table.c[column].type
    assert isinstance(kind, sa.String) and kind.length is not None
    return kind.length


_ID_WIDTHS = tuple(_width(USAGE_EVENTS, c) for c in _IDS)  # per event below: read from the table once


def _fits(event: UsageEvent) -> bool:
    """The event's ids and names fit the ledger's columns, and its status is one the ledger knows."""
    request_id, tenant, key_id, model = _ID_WIDTHS
    return (
        event.status in STATUSES
        and len(event.request_id) <= request_id
        and len(event.tenant) <= tenant
        and len(event.key_id) <= key_id
        and len(event.model) <= model
    )


def _cut(text: str, column: str) -> str:
    """``text`` cut to the width of ``usage_set_aside``'s ``column``."""
    return text[: _width(USAGE_SET_ASIDE, column)]


def _priced(event: UsageEvent, started: datetime, price_list: _PriceList) -> Charge | str:
    """The event's charge (``started``: its start in UTC), or why it cannot be recorded."""
    if not _fits(event):
        return INVALID_IDS
    prices = price_list.at(event.model, started)
    if prices is None:
        return UNPRICED
    try:
        return charge(event, prices)
    except ValueError:  # TokenCounts refuses impossible counts
        return INVALID_COUNTS


def _usage_row(event: UsageEvent, cost: Charge, started: datetime) -> tuple[Any, ...]:
    """The event's row of ``usage_events``, its values in ``_USAGE_COLUMNS``' order (``started``: its start in UTC)."""
    return (
        event.request_id,
        event.tenant,
        event.key_id,
        event.model,
        event.status,
        event.prompt_tokens,
        event.cached_tokens,
        event.completion_tokens,
        cost.total_nano_dkk,
        cost.input_uncached_nano_dkk,
        cost.input_cached_nano_dkk,
        cost.output_nano_dkk,
        started,
        _utc(event.finished_at),
    )


def _json_row(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """A usage row for PostgreSQL's JSON batch: its times in ISO 8601 with their zone."""
    *values, started, finished = row
    return (*values, started.isoformat(), finished.isoformat())


def _sqlite_row(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """A usage row for SQLite's driver, its times as SQLAlchemy stores them there (``YYYY-MM-DD
    HH:MM:SS.ffffff``, in UTC, without the zone), so that the ledger reads every row alike."""
    *values, started, finished = row
    return (*values, started.isoformat(" ", "microseconds")[:26], finished.isoformat(" ", "microseconds")[:26])


def _set_aside(
    connection: sa.Connection, refused: dict[str, tuple[UsageEvent, str]], leases: Mapping[str, str]
) -> dict[str, str]:
    """Keeps the refused events in ``usage_set_aside`` (ids cut to the columns' widths, times as given or now);
    returns those that were not set aside before (request id: reason)."""
    if not refused:
        return {}
    now = datetime.now(UTC)
    rows = [
        {
            "request_id": _cut(request_id, "request_id"),
            "tenant": _cut(event.tenant, "tenant"),
            "key_id": _cut(event.key_id, "key_id"),
            "model": _cut(event.model, "model"),
            "prompt_tokens": _int32(event.prompt_tokens),
            "cached_tokens": _int32(event.cached_tokens),
            "completion_tokens": _int32(event.completion_tokens),
            "started_at": _aware_or(event.started_at, now),
            "finished_at": _aware_or(event.finished_at, now),
            "status": _cut(event.status, "status"),
            "lease_id": _cut(leases.get(request_id) or "", "lease_id") or None,
            "reason": reason,
            "set_aside_at": now,
        }
        for request_id, (event, reason) in refused.items()
    ]
    insert = _insert_ignoring_duplicates(USAGE_SET_ASIDE, connection.dialect.name)
    kept = {r[0] for r in connection.execute(insert.returning(USAGE_SET_ASIDE.c.request_id), rows).fetchall()}
    return {request_id: reason for request_id, (_, reason) in refused.items() if _cut(request_id, "request_id") in kept}


def _int32(count: int) -> int:
    return max(-(2**31), min(2**31 - 1, count))


def _aware_or(moment: datetime, fallback: datetime) -> datetime:
    return moment.astimezone(UTC) if moment.tzinfo is not None else fallback
