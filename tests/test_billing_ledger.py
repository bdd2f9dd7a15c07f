"""The usage ledger on real databases (SQLite file and a throwaway PostgreSQL): migrations, prices over time,
idempotent recording, totals, and no content columns.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa

from config.settings import load_config
from deployments.billing.ledger import FAILED, Ledger, UsageEvent
from deployments.billing.pricing import TokenPrices
from deployments.billing.retention import purge, retention_cutoff
from deployments.billing.service import BillingService, billing_spec
from deployments.billing.tables import API_KEYS, AUDIT_LOG, BUDGET_SPEND, MEMBERS, TENANTS, USAGE_EVENTS
from deployments.database import database_url
from deployments.request_ids import new_request_id
from tests.inprocess import clean_postgres

T0 = datetime(2026, 11, 1, tzinfo=UTC)
DEFAULT = TokenPrices.from_dkk_per_million(Decimal("6.00"), Decimal("3.00"), Decimal("45.00"))
CHEAPER = TokenPrices.from_dkk_per_million(Decimal("4.00"), Decimal("2.00"), Decimal("30.00"))


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    if request.param == "sqlite":
        url = database_url(tmp_path, None)
    else:
        url = request.getfixturevalue("postgres_url")
        engine = sa.create_engine(url)
        with engine.begin() as c:  # a clean schema per test
            c.execute(sa.text("DROP SCHEMA public CASCADE"))
            c.execute(sa.text("CREATE SCHEMA public"))
        engine.dispose()
    ledger = Ledger(url)
    ledger.migrate()
    ledger.set_price("m", DEFAULT, T0)
    yield ledger
    ledger.dispose()


def event(request_id: str, at: datetime = T0 + timedelta(days=1), **counts: int) -> UsageEvent:
    c = {"prompt_tokens": 1000, "cached_tokens": 768, "completion_tokens": 100, **counts}
    return UsageEvent(
        request_id, "kommune-x", "k1", "m", started_at=at, finished_at=at + timedelta(seconds=2), status="ok", **c
    )


def test_database_url_choice(tmp_path: Path) -> None:
    assert database_url(tmp_path, None) == f"sqlite:///{tmp_path / 'anker.db'}"
    assert database_url(tmp_path, "postgresql://u@h/db") == "postgresql+psycopg://u@h/db"


def test_request_ids_sort_by_the_millisecond_they_were_made_and_are_otherwise_random(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The ledger's primary key grows at its end (deployments/request_ids.py): an id sorts after every id made in an
    earlier millisecond, whatever its random part."""
    base_ns = int(T0.timestamp()) * 10**9
    clock = iter([base_ns + ms * 10**6 + 999 for ms in (0, 0, 1, 2, 1000, 86_400_000)])
    monkeypatch.setattr("deployments.request_ids.time.time_ns", lambda: next(clock))
    ids = [new_request_id() for _ in range(6)]
    assert all(len(i) == 32 and set(i) <= set("0123456789abcdef") for i in ids)
    assert ids[0][:12] == ids[1][:12] and ids[0] != ids[1]  # one millisecond: the random part tells them apart
    assert ids[1:] == sorted(ids[1:]) and ids[0] < ids[2]
    assert int(ids[4][:12], 16) - int(ids[0][:12], 16) == 1000
    monkeypatch.undo()
    many = {new_request_id()[12:] for _ in range(10_000)}
    assert len(many) == 10_000


def test_migrations_are_versioned_and_rerunnable(ledger: Ledger) -> None:
    assert ledger.schema_revision() == "0007"
    ledger.migrate()  # at every start: a no-op once at head
    assert ledger.schema_revision() == "0007"


def test_recording_is_idempotent_on_request_id(ledger: Ledger) -> None:
    assert ledger.record([event("r1"), event("r2")]) == 2
    assert ledger.record([event("r1"), event("r2"), event("r3")]) == 1  # a retried batch bills only the new one
    totals = ledger.totals("kommune-x", T0, T0 + timedelta(days=30))
    assert totals.requests == 3 and totals.cost_nano_dkk == 3 * 8_196_000
    assert (totals.prompt_tokens, totals.cached_tokens, totals.completion_tokens) == (3000, 2304, 300)


def test_a_batch_and_a_single_row_are_stored_alike(ledger: Ledger) -> None:
    """A batch goes in as one statement (PostgreSQL: one array a column; SQLite: one JSON array of rows), a row the
    batch could not take goes in on its own through SQLAlchemy: both store every column alike, times to the
    microsecond in UTC (SQLite compares them as text: the format must be SQLAlchemy's own), whatever zone they
    came in."""
    copenhagen = timezone(timedelta(hours=1))
    at = datetime(2026, 11, 3, 12, 0, 0, tzinfo=copenhagen)  # whole seconds: no fraction in isoformat's default
    batched = replace(event("batched", at), finished_at=at + timedelta(microseconds=7), status="cancelled")
    alone = replace(batched, request_id="alone")
    ledger.record([batched])
    row = {**_row_of(ledger, "batched"), "request_id": "alone"}
    with ledger.engine.begin() as db:  # the per-row path, as ``_insert`` takes it when a batch is refused
        db.execute(sa.insert(USAGE_EVENTS), [row])
    rows = {r["request_id"]: r for r in ledger.events("kommune-x")}
    assert {k: v for k, v in rows["batched"].items() if k != "request_id"} == {
        k: v for k, v in rows["alone"].items() if k != "request_id"
    }
    assert rows["batched"]["started_at"] == at and rows["batched"]["finished_at"] == alone.finished_at
    in_window = ledger.totals("kommune-x", at, at + timedelta(microseconds=1))
    assert in_window.requests == 2  # the window's bounds compare with the stored times as SQLAlchemy writes them
    assert ledger.totals("kommune-x", at + timedelta(microseconds=1), at + timedelta(days=1)).requests == 0


def _row_of(ledger: Ledger, request_id: str) -> dict[str, object]:
    with ledger.engine.connect() as db:
        row = db.execute(sa.select(USAGE_EVENTS).where(USAGE_EVENTS.c.request_id == request_id)).one()
    values = dict(row._mapping)
    values["started_at"] = values["started_at"].replace(tzinfo=values["started_at"].tzinfo or UTC)
    values["finished_at"] = values["finished_at"].replace(tzinfo=values["finished_at"].tzinfo or UTC)
    return values


def test_concurrent_deliveries_of_the_same_events_bill_once(ledger: Ledger) -> None:
    batch = [event(f"c{i}") for i in range(50)]
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(ledger.record(batch))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(results) == 50 and ledger.totals("kommune-x", T0, T0 + timedelta(days=30)).requests == 50


def test_a_price_change_applies_from_its_time_on(ledger: Ledger) -> None:
    change = T0 + timedelta(days=10)
    ledger.record([event("before", T0 + timedelta(days=5))])
    assert ledger.ensure_price("m", CHEAPER, change) and not ledger.ensure_price("m", CHEAPER, change)
    ledger.record([event("after", change + timedelta(hours=1))])
    costs = {e["request_id"]: e["cost_nano_dkk"] for e in ledger.events("kommune-x")}
    assert costs == {"before": 8_196_000, "after": 232 * 4000 + 768 * 2000 + 100 * 30000}


def test_a_row_the_database_refuses_is_set_aside_and_its_batch_recorded(ledger: Ledger) -> None:
    """A batch goes in as one statement (on PostgreSQL, one array a column); if the database refuses it, each row is
    tried on its own, and the one it refuses is set aside. A count past the column's 32 bits is such a row on
    PostgreSQL; SQLite stores it, and refuses a cost past 64 bits."""
    huge = event("huge", completion_tokens=2**40)
    enormous = event("enormous", completion_tokens=2**62)
    batch = [event("first"), huge, enormous, event("last")]
    recorded = ledger.record_new(batch)
    if ledger.engine.dialect.name == "postgresql":
        assert set(recorded.new) == {"first", "last"}
        assert recorded.set_aside == {"huge": "refused_by_database", "enormous": "refused_by_database"}
        assert [r["completion_tokens"] for r in ledger.set_aside()] == [2**31 - 1] * 2  # kept as near as fits
    else:
        assert set(recorded.new) == {"first", "huge", "last"}
        assert recorded.set_aside == {"enormous": "refused_by_database"}
    again = ledger.record_new(batch)
    assert again.new == {} and again.set_aside == {}


def test_what_cannot_be_recorded_is_set_aside_with_its_reason_and_the_rest_is_recorded(ledger: Ledger) -> None:
    """Issue 15, hole 3: one report that cannot be recorded used to fail its whole batch, so its sender re-sent the
    batch forever and billing stopped for that replica. It is set aside (counts and ids, a reason code), unbilled,
    and every other report of the batch is recorded and settled."""
    unpriced = UsageEvent("u1", "kommune-x", "k1", "other", 1, 0, 1, T0, T0, "ok")
    impossible = event("bad", cached_tokens=2000)
    negative = event("negative", completion_tokens=-1)
    too_wide = replace(event("wide"), tenant="t" * 65)  # wider than the ledger's column (PostgreSQL refuses it)
    unknown_status = replace(event("status"), status="made-up")
    batch = [event("fine"), unpriced, impossible, negative, too_wide, unknown_status, event("also-fine")]
    recorded = ledger.record_new(batch)
    assert set(recorded.new) == {"fine", "also-fine"}
    assert recorded.set_aside == {
        "u1": "unpriced_model",
        "bad": "invalid_counts",
        "negative": "invalid_counts",
        "wide": "invalid_ids",
        "status": "invalid_ids",
    }
    assert ledger.request_ids("kommune-x") == ["also-fine", "fine"]
    aside = {r["request_id"]: r for r in ledger.set_aside()}
    assert set(aside) == set(recorded.set_aside) and aside["u1"]["model"] == "other"
    assert aside["wide"]["tenant"] == "t" * 64 and aside["bad"]["cached_tokens"] == 2000  # as reported, cut to fit

    again = ledger.record_new(batch)  # a sender that missed the acknowledgement: nothing new, nothing twice
    assert again.new == {} and again.set_aside == {} and len(ledger.set_aside()) == 5

    # The model gets its price later (billing starts with it in the config): a request served before the model's
    # first price pays that first price.
    ledger.set_price("other", CHEAPER, T0 + timedelta(days=3))
    assert set(ledger.record_set_aside().new) == {"u1"}
    assert ledger.price_at("other", T0) == CHEAPER
    assert next(r for r in ledger.events("kommune-x") if r["request_id"] == "u1")["cost_nano_dkk"] == 4000 + 30000
    assert {r["request_id"] for r in ledger.set_aside()} == {"bad", "negative", "wide", "status"}
    assert ledger.request_ids("kommune-x") == ["also-fine", "fine", "u1"]


def test_totals_are_per_tenant_and_window(ledger: Ledger) -> None:
    ledger.record([event("in"), event("late", T0 + timedelta(days=40))])
    other = UsageEvent("o1", "other-tenant", "k2", "m", 10, 0, 10, T0 + timedelta(days=1), T0, "ok")
    ledger.record([other])
    assert ledger.totals("kommune-x", T0, T0 + timedelta(days=30)).requests == 1
    assert ledger.totals("other-tenant", T0, T0 + timedelta(days=30)).cost_nano_dkk == 10 * 6000 + 10 * 45000
    assert ledger.totals("nobody", T0, T0 + timedelta(days=30)).requests == 0


def test_the_schema_has_no_place_for_content(ledger: Ledger) -> None:
    columns = {c["name"] for c in sa.inspect(ledger.engine).get_columns("usage_events")}
    assert columns == {
        "request_id",
        "tenant",
        "key_id",
        "model",
        "prompt_tokens",
        "cached_tokens",
        "completion_tokens",
        "cost_nano_dkk",
        "started_at",
        "finished_at",
        "status",
        "cost_input_uncached_nano_dkk",
        "cost_input_cached_nano_dkk",
        "cost_output_nano_dkk",
    }
    # Every text column of every table holds an id, a name, a setting or a code: none could hold a prompt.
    text_columns = {
        f"{table}.{c['name']}"
        for table in sa.inspect(ledger.engine).get_table_names()
        for c in sa.inspect(ledger.engine).get_columns(table)
        if isinstance(c["type"], (sa.String, sa.Text)) and table != "alembic_version"
    }
    assert text_columns == {
        "tenants.tenant",
        "tenants.display_name",
        "tenants.plan",
        "tenants.budget_kind",
        "members.member_id",
        "members.tenant",
        "members.name",
        "members.role",
        "api_keys.key_id",
        "api_keys.tenant",
        "api_keys.name",
        "api_keys.member_id",
        "api_keys.role",
        "api_keys.allowed_models",
        "model_prices.model",
        "usage_events.request_id",
        "usage_events.tenant",
        "usage_events.key_id",
        "usage_events.model",
        "usage_events.status",
        "usage_set_aside.request_id",
        "usage_set_aside.tenant",
        "usage_set_aside.key_id",
        "usage_set_aside.model",
        "usage_set_aside.status",
        "usage_set_aside.lease_id",
        "usage_set_aside.reason",
        "budget_spend.scope",
        "budget_spend.scope_id",
        "budget_spend.period",
        "budget_leases.lease_id",
        "budget_leases.tenant",
        "budget_leases.key_id",
        "budget_leases.tenant_period",
        "budget_leases.key_period",
        "audit_log.actor",
        "audit_log.tenant",
        "audit_log.action",
        "audit_log.target",
        "audit_log.details",
    }


UNIT = DEFAULT.output_nano_dkk  # one output token's cost


def budgeted(ledger: Ledger, limit_units: int) -> None:
    from deployments.keys import ensure_tenant

    with ledger.engine.begin() as db:
        ensure_tenant(db, "kommune-x")
        db.execute(TENANTS.update().values(budget_kind="monthly", budget_nano_dkk=limit_units * UNIT))


def budget_state(ledger: Ledger, now: datetime) -> tuple[int, int]:
    """(spent, reserved) of kommune-x's monthly budget, in units."""
    from deployments.billing import budgets

    with ledger.engine.begin() as db:
        [state] = budgets.budget_summary(db, "kommune-x", "k1", now)
    return state.spent_nano_dkk // UNIT, state.reserved_nano_dkk // UNIT


def test_concurrent_leases_stop_at_the_budget_and_settle_release_and_lapse(ledger: Ledger) -> None:
    """16 threads each ask a lease of 3 units against a budget of 10: three fit, a fourth is the budget's last
    request (9 < 10), the rest are refused; never more, however they interleave. Then settlement, release and
    lapse each give back what the lease held, and only usage is spent."""
    from deployments.billing import budgets
    from deployments.errors import InsufficientQuota

    budgeted(ledger, 10)
    now = T0 + timedelta(days=3)
    granted: list[str] = []
    refused: list[int] = []
    start = threading.Barrier(16)

    def attempt(i: int) -> None:
        start.wait()
        try:
            with ledger.engine.begin() as db:
                grant = budgets.grant_lease(db, "kommune-x", "k1", None, 3 * UNIT, 3 * UNIT, now, 30.0)
            assert grant is not None and grant.amount_nano_dkk == 3 * UNIT
            granted.append(grant.lease_id)
        except InsufficientQuota:
            refused.append(i)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (len(granted), len(refused)) == (4, 12)
    assert budget_state(ledger, now) == (0, 12)  # overspent by at most the last request's maximum cost
    # A request of the first lease costs one unit: it moves from the lease's reservation to the spend.
    ledger.record_new([event("r1", now, prompt_tokens=0, cached_tokens=0, completion_tokens=1)], {"r1": granted[0]})
    assert budget_state(ledger, now) == (1, 11)
    with ledger.engine.begin() as db:  # its replica gives the lease back: the 2 units it still held
        assert budgets.release_leases(db, [granted[0], "lease-unknown"]) == [granted[0]]
        assert budgets.renew_leases(db, granted[1:2], now + timedelta(seconds=60)) == granted[1:2]
    assert budget_state(ledger, now) == (1, 9)
    with ledger.engine.begin() as db:  # two leases lapse; the renewed one is still held
        assert budgets.release_expired(db, now + timedelta(seconds=31)) == 2
    assert budget_state(ledger, now) == (1, 3)
    # Usage of a lapsed lease that arrives late is still spent, and releases nothing it no longer holds.
    ledger.record_new([event("r2", now, prompt_tokens=0, cached_tokens=0, completion_tokens=2)], {"r2": granted[2]})
    assert budget_state(ledger, now) == (3, 3)


def test_a_lease_grows_within_a_share_of_the_room_and_tops_up_in_place(ledger: Ledger) -> None:
    from deployments.billing import budgets

    budgeted(ledger, 100)
    now = T0 + timedelta(days=3)
    with ledger.engine.begin() as db:
        first = budgets.grant_lease(db, "kommune-x", "k1", None, 2 * UNIT, 50 * UNIT, now, 30.0)
        assert first is not None and first.amount_nano_dkk == 25 * UNIT  # a quarter of the 100 left
        again = budgets.grant_lease(db, "kommune-x", "k1", first.lease_id, 2 * UNIT, 50 * UNIT, now, 30.0)
        assert again == budgets.LeaseGrant(first.lease_id, 75 * UNIT // 4)  # a quarter of the 75 left, same lease
        assert budgets.grant_lease(db, "kommune-x", "k2", None, UNIT, UNIT, now, 30.0) is not None  # the tenant's
        assert budgets.grant_lease(db, "nobody", "k9", None, UNIT, UNIT, now, 30.0) is None  # no budget applies
    assert budget_state(ledger, now) == (0, 44)


def race_sweep_and_settlement(ledger: Ledger, lease_id: str, request_id: str, now: datetime) -> None:
    """The lapse sweep and the settlement of one request of ``lease_id``, started at once in two threads."""
    from deployments.billing import budgets

    start = threading.Barrier(2)

    def sweep() -> None:
        start.wait()
        with ledger.engine.begin() as db:
            budgets.release_expired(db, now + timedelta(seconds=2))

    def settle() -> None:
        start.wait()
        usage = event(request_id, now, prompt_tokens=0, cached_tokens=0, completion_tokens=1)
        ledger.record_new([usage], {request_id: lease_id})

    threads = [threading.Thread(target=sweep), threading.Thread(target=settle)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_settlement_and_the_lapse_sweep_never_release_a_lease_twice(ledger: Ledger) -> None:
    """The sweep and a batch's settlement race for the same lapsed lease, each in its own transaction: whichever
    comes first, the lease's amount goes back once, and the usage is spent once."""
    from deployments.billing import budgets

    rounds = 40
    budgeted(ledger, 10 * rounds)
    now = T0 + timedelta(days=3)
    for i in range(rounds):
        with ledger.engine.begin() as db:
            grant = budgets.grant_lease(db, "kommune-x", "k1", None, 3 * UNIT, 3 * UNIT, now, 1.0)
        assert grant is not None
        race_sweep_and_settlement(ledger, grant.lease_id, f"race-{i}", now)
        assert budget_state(ledger, now) == (i + 1, 0), i


def test_a_settlement_takes_budget_rows_before_leases_as_a_grant_does(postgres_url: str, tmp_path: Path) -> None:
    """A grant locks a key's budget rows, then tops up its lease; a settlement of the same lease used to lock the
    lease first, then the budget rows: two replicas' calls at once then waited for each other, and PostgreSQL failed
    one (DeadlockDetected, about once in six runs of test_billing_admission's two replicas). Here a transaction
    holds the budget row as a grant does while the settlement starts, then takes the lease: the settlement waits for
    the budget row without holding the lease, so both finish."""
    from deployments.billing import budgets
    from deployments.billing.tables import BUDGET_LEASES

    url = clean_postgres(postgres_url)
    ledger = Ledger(url)
    ledger.migrate()
    ledger.set_price("m", DEFAULT, T0)
    budgeted(ledger, 100)
    now = T0 + timedelta(days=3)
    with ledger.engine.begin() as db:
        grant = budgets.grant_lease(db, "kommune-x", "k1", None, 3 * UNIT, 3 * UNIT, now, 60.0)
    assert grant is not None
    settled: list[BaseException | None] = []

    def settle() -> None:
        try:
            ledger.record_new([event("settled", now, prompt_tokens=0, cached_tokens=0, completion_tokens=1)],
                              {"settled": grant.lease_id})  # fmt: skip
            settled.append(None)
        except BaseException as exc:  # kept for the assertion below
            settled.append(exc)

    with ledger.engine.begin() as grant_like:
        grant_like.execute(sa.text("SET LOCAL lock_timeout = '20s'"))
        grant_like.execute(
            sa.select(BUDGET_SPEND).where(BUDGET_SPEND.c.scope == "tenant").with_for_update()  # the budget row first
        ).all()
        settling = threading.Thread(target=settle)
        settling.start()
        settling.join(1.5)  # long enough to reach its locks (the deadlock check runs after 1 s of waiting)
        grant_like.execute(
            sa.select(BUDGET_LEASES).where(BUDGET_LEASES.c.lease_id == grant.lease_id).with_for_update()
        ).all()  # then the lease: free, since the settlement has not taken it
    settling.join(30)
    assert settled == [None]
    assert budget_state(ledger, now) == (1, 2)  # 1 unit spent, the lease's other 2 still held
    ledger.dispose()


def test_usage_by_day_and_model_with_costs_split_by_kind(ledger: Ledger) -> None:
    ledger.set_price("m2", CHEAPER, T0)
    day1, day2 = T0 + timedelta(days=1, hours=23, minutes=59), T0 + timedelta(days=2, minutes=1)
    ledger.record([event("a", day1), event("b", day2), event("c", day2)])
    ledger.record([UsageEvent("d", "kommune-x", "k2", "m2", 100, 0, 10, day2, day2, "ok")])
    end = T0 + timedelta(days=30)
    by_day = ledger.usage("kommune-x", T0, end, "day")
    assert [(b.start.day, b.requests) for b in by_day] == [(2, 1), (3, 3)]
    assert by_day[0].end - by_day[0].start == timedelta(days=1)
    by_model = {b.model: b for b in ledger.usage("kommune-x", T0, end, "model")}
    # m: 232 uncached x 6000 + 768 cached x 3000 + 100 output x 45000 per request
    m = by_model["m"]
    assert (m.requests, m.cost_input_uncached_nano_dkk, m.cost_input_cached_nano_dkk, m.cost_output_nano_dkk) == (
        3,
        3 * 232 * 6000,
        3 * 768 * 3000,
        3 * 100 * 45000,
    )
    assert by_model["m2"].cost_nano_dkk == 100 * 4000 + 10 * 30000
    [whole] = ledger.usage("kommune-x", T0, end)
    assert whole.cost_nano_dkk == m.cost_nano_dkk + by_model["m2"].cost_nano_dkk
    assert ledger.usage("kommune-x", T0, end, None, key_id="k2")[0].requests == 1


def test_failed_requests_without_output_cost_nothing_cut_off_ones_pay_their_prompt_and_output(ledger: Ledger) -> None:
    at = T0 + timedelta(days=1)
    failed = UsageEvent("f", "kommune-x", "k1", "m", 500, 0, 0, at, at, "engine_unavailable")
    cut = UsageEvent("c", "kommune-x", "k1", "m", 500, 0, 7, at, at, "cancelled")
    left_before_the_first_token = UsageEvent("p", "kommune-x", "k1", "m", 500, 0, 0, at, at, "cancelled")
    answered_with_an_error = UsageEvent("e", "kommune-x", "k1", "m", 500, 0, 7, at, at, FAILED)
    ledger.record([failed, cut, left_before_the_first_token, answered_with_an_error])
    rows = {r["request_id"]: r for r in ledger.events("kommune-x")}
    assert rows["f"]["cost_nano_dkk"] == 0 and rows["e"]["cost_nano_dkk"] == 0
    assert rows["c"]["cost_nano_dkk"] == 500 * 6000 + 7 * 45000
    assert rows["p"]["cost_nano_dkk"] == 500 * 6000  # its prefill ran (issue 15, hole 4)


def test_retention_keeps_whole_financial_years_as_the_bookkeeping_act_asks() -> None:
    # 60 months: 2021's rows are kept to the end of 2026 (5 years from the end of their year), and go in January.
    assert retention_cutoff(datetime(2026, 11, 26, 14, tzinfo=UTC), 60) == datetime(2021, 1, 1, tzinfo=UTC)
    assert retention_cutoff(datetime(2026, 12, 31, 23, tzinfo=UTC), 60) == datetime(2021, 1, 1, tzinfo=UTC)
    assert retention_cutoff(datetime(2027, 1, 1, tzinfo=UTC), 60) == datetime(2022, 1, 1, tzinfo=UTC)
    assert retention_cutoff(datetime(2027, 1, 1, tzinfo=UTC), 1) == datetime(2026, 1, 1, tzinfo=UTC)
    with pytest.raises(ValueError):
        retention_cutoff(T0, 0)


def test_rows_past_their_retention_are_deleted_and_nothing_else(ledger: Ledger) -> None:
    cutoff = retention_cutoff(datetime(2027, 2, 15, tzinfo=UTC), 2)
    assert cutoff == datetime(2026, 1, 1, tzinfo=UTC)
    old, kept = datetime(2025, 11, 10, tzinfo=UTC), datetime(2026, 1, 5, tzinfo=UTC)
    ledger.set_price("m", DEFAULT, datetime(2025, 3, 1, tzinfo=UTC))  # replaced before the cutoff: goes
    ledger.set_price("m", CHEAPER, datetime(2025, 6, 1, tzinfo=UTC))  # in force at the cutoff: stays
    ledger.record([replace(event("old", old), key_id="k-gone"), replace(event("kept", kept), key_id="k-used")])

    def key(key_id: str, revoked: datetime | None, member: str | None = None) -> dict[str, object]:
        revoked_at = revoked.timestamp() if revoked else None
        return {"key_id": key_id, "tenant": "kommune-x", "key_hmac": bytes(32), "created_at": old.timestamp(),
                "revoked_at": revoked_at, "member_id": member, "role": "member"}  # fmt: skip

    def member(member_id: str, removed: datetime | None) -> dict[str, object]:
        return {"member_id": member_id, "tenant": "kommune-x", "name": "n", "role": "member", "created_at": old,
                "removed_at": removed}  # fmt: skip

    set_aside = [replace(event(request_id, at), model="unpriced") for request_id, at in (("a-old", old), ("a", kept))]
    assert len(ledger.record_new(set_aside).set_aside) == 2
    with ledger.engine.begin() as db:
        db.execute(TENANTS.insert().values(tenant="kommune-x", display_name="K", plan="payg", plan_fee_ore=0,
                                           discount_bp=0, created_at=old))  # fmt: skip
        db.execute(MEMBERS.insert(), [member("m-gone", old), member("m-with-key", old), member("m-active", None)])
        db.execute(API_KEYS.insert(), [key("k-gone", old), key("k-used", old, "m-with-key"), key("k-active", None)])
        db.execute(AUDIT_LOG.insert(), [{"at": at, "actor": "operator", "tenant": "kommune-x", "action": "a",
                                          "target": "t", "details": "{}"} for at in (old, cutoff)])  # fmt: skip
        db.execute(BUDGET_SPEND.insert(), [{"scope": "tenant", "scope_id": "kommune-x", "period": period,
                                             "spent_nano_dkk": 1, "reserved_nano_dkk": 0}
                                            for period in ("2025-12", "2026-01", "all")])  # fmt: skip
        deleted = purge(db, cutoff)
    assert deleted == {"usage_events": 1, "usage_set_aside": 1, "audit_log": 1, "budget_spend": 1, "model_prices": 1,
                       "api_keys": 1, "members": 1}  # fmt: skip
    assert [r["request_id"] for r in ledger.set_aside()] == ["a"]
    with ledger.engine.connect() as db:
        assert ledger.request_ids("kommune-x") == ["kept"]
        assert {r.key_id for r in db.execute(sa.select(API_KEYS.c.key_id))} == {"k-used", "k-active"}
        assert {r.member_id for r in db.execute(sa.select(MEMBERS.c.member_id))} == {"m-with-key", "m-active"}
        assert sorted(r.period for r in db.execute(sa.select(BUDGET_SPEND.c.period))) == ["2026-01", "all"]
        assert db.execute(sa.select(sa.func.count()).select_from(AUDIT_LOG)).scalar() == 1
    assert ledger.price_at("m", cutoff) == CHEAPER and ledger.price_at("m", T0 + timedelta(days=1)) == DEFAULT
    with ledger.engine.begin() as db:
        assert not any(purge(db, cutoff).values()), "a second purge finds nothing"


async def test_the_billing_service_keeps_rows_for_the_configured_months(tmp_path: Path) -> None:
    config = load_config(environ={"ANKER_DATA_DIR": str(tmp_path), "ANKER__BILLING__RETENTION_MONTHS": "3"})
    spec = billing_spec(config)
    assert spec.retention_months == 3
    service = BillingService(spec)
    try:
        model = config.models[0].name
        service.ledger.set_price(model, DEFAULT, datetime(2025, 1, 1, tzinfo=UTC))
        last_year, this_year = event("2025", datetime(2025, 6, 15, tzinfo=UTC)), event("2026", T0 - timedelta(days=1))
        service.ledger.record([replace(last_year, model=model), replace(this_year, model=model)])
        # In December 2026, three months back is September 2026: 2025's rows go.
        deleted = await service.purge_expired(now=datetime(2026, 12, 2, tzinfo=UTC))
        assert deleted["usage_events"] == 1 and service.ledger.request_ids("kommune-x") == ["2026"]
    finally:
        service.ledger.dispose()
