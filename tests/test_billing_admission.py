"""Admission from leases (``deployments/billing/admission.py``): engine replicas admit requests from slices of a key's
rate limits and budgets that the billing actor grants, on a real ledger (SQLite and PostgreSQL). Each replica here
is the replica's own billing client over the billing deployment's real class; only the handle's transport is a
double.

What must hold: a key's requests cost no call to billing while its slice lasts; a key's limits hold across replicas;
a budget is overspent by at most one request's maximum cost, however many replicas admit at once; what a replica
holds goes back once its usage is recorded, and lapses if the replica stops renewing it; a client that leaves
during a top-up loses nothing of the key's slice; while billing is away, a key is trusted for no longer than the key
cache's life (a revoked one too), and within it a key without a budget meets its limits on the replica alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from deployments.billing.actor import Billing
from deployments.billing.client import ServeBillingClient
from deployments.billing.governance import Actor
from deployments.billing.ledger import COMPLETED, UsageEvent
from deployments.billing.pricing import TokenPrices
from deployments.billing.service import BillingService, BillingSpec
from deployments.billing.tables import API_KEYS
from deployments.contracts import Admission, AdmissionRequest, UsageReport
from deployments.errors import BillingUnavailable, InsufficientQuota, RateLimited, TokenRateLimited
from deployments.keys import KeyRecord
from testkit.doubles import InProcessHandleDouble

MODEL = "m"
PRICES = TokenPrices.from_dkk_per_million(Decimal("6.00"), Decimal("3.00"), Decimal("45.00"))
PROMPT, MAX_OUTPUT = 100, 20
MAX_COST_NANO = PROMPT * PRICES.input_uncached_nano_dkk + MAX_OUTPUT * PRICES.output_nano_dkk


@dataclass
class Billed:
    """The billing deployment's class on a real ledger, and the handle every replica reaches it by."""

    billing: Any
    handle: InProcessHandleDouble

    @property
    def service(self) -> BillingService:
        service: BillingService = self.billing._service
        return service

    def replica(self) -> ServeBillingClient:
        """A replica's billing client: its key cache, admission and usage outbox."""
        return ServeBillingClient(self.handle, key_cache_ttl_s=60.0, flush_interval_s=0.05)  # type: ignore[arg-type]

    def key(self, tenant: str = "t", **settings: Any) -> str:
        return self.service.governance.create_key(Actor.operator("test"), tenant, **settings)[1]

    def spent_and_reserved(self, key: KeyRecord) -> tuple[int, int]:
        from deployments.billing import budgets

        with self.service.ledger.engine.begin() as db:
            [state] = budgets.budget_summary(db, key.tenant, key.key_id, datetime.now(UTC))
        return state.spent_nano_dkk, state.reserved_nano_dkk


@pytest.fixture
async def billed(tmp_path: Path, db: str | None) -> AsyncIterator[Billed]:
    spec = BillingSpec(tmp_path, db, {MODEL: PRICES}, default_rpm=600, default_tpm=2_000_000)
    billing = Billing.func_or_class(spec)
    try:
        yield Billed(billing, InProcessHandleDouble(billing))
    finally:
        billing._sweeper.cancel()
        billing._service.ledger.dispose()


@pytest.fixture
async def replica(billed: Billed) -> AsyncIterator[ServeBillingClient]:
    client = billed.replica()
    outbox = asyncio.create_task(client.outbox.run())
    yield client
    outbox.cancel()


def ask(key: KeyRecord, n: int = 0, prompt: int = PROMPT, max_output: int = MAX_OUTPUT) -> AdmissionRequest:
    return AdmissionRequest(f"chatcmpl-{key.key_id}-{n}", key.key_id, key.tenant, MODEL, prompt, max_output)


async def verified(replica: ServeBillingClient, key: str) -> KeyRecord:
    record = await replica.verify(key)
    assert record is not None
    return record


def finished(request: AdmissionRequest, completion_tokens: int = MAX_OUTPUT) -> UsageEvent:
    now = datetime.now(UTC)
    return UsageEvent(
        request.billing_id,
        request.tenant,
        request.key_id,
        MODEL,
        request.prompt_tokens,
        0,
        completion_tokens,
        now,
        now,
        COMPLETED,
    )


def end(replica: ServeBillingClient, request: AdmissionRequest, admission: Admission, completion: int = 0) -> None:
    """The request ended: its report into the outbox, what it did not use back to the replica's slice."""
    replica.submit(UsageReport(finished(request, completion), admission.lease_id), admission)


async def test_a_keys_requests_are_admitted_from_one_slice_without_a_call_each(
    billed: Billed, replica: ServeBillingClient
) -> None:
    key = await verified(replica, billed.key())
    remaining = []
    for n in range(20):
        admission = await replica.admit(key, ask(key, n))
        remaining.append(int(admission.rate_limit_headers["x-ratelimit-remaining-requests"]))
        end(replica, ask(key, n), admission, completion=1)
    assert replica.admission.lease_calls == 1  # the first request's top-up: a slice for the next ones too
    # The headers count every request, as one bucket would: the actor's after the slice, and the slice's rest.
    assert remaining == list(range(599, 579, -1))
    await replica.admission.give_back()  # the unused permits go back to the key's bucket at the actor
    requests_left, _ = billed.service.limiter.levels(key.key_id, 600, 2_000_000)
    assert 580 <= requests_left < 581


async def test_two_replicas_share_a_keys_rate_limit(billed: Billed) -> None:
    a, b = billed.replica(), billed.replica()
    raw = billed.key(rpm=10)
    keys = [await verified(a, raw), await verified(b, raw)]
    admitted = 0
    for n in range(10):
        replica = (a, b)[n % 2]
        await replica.admit(keys[n % 2], ask(keys[n % 2], n))
        admitted += 1
    for replica, key in zip((a, b), keys, strict=True):
        with pytest.raises(RateLimited) as refused:
            await replica.admit(key, ask(key, 99))
        assert refused.value.retry_after_s >= 1
    assert admitted == 10


async def test_budgets_hold_across_replicas_admitting_at_once(billed: Billed) -> None:
    """Two replicas admit 40 requests each at once against a budget of 10 requests' maximum cost: never more than
    one request beyond it, every report settles, and once the leases go back only usage is spent."""
    replicas = [billed.replica(), billed.replica()]
    outboxes = [asyncio.create_task(r.outbox.run()) for r in replicas]
    budget_nano = 10 * MAX_COST_NANO
    raw = billed.key(budget_dkk=str(Decimal(budget_nano) / 10**9))
    keys = [await verified(r, raw) for r in replicas]

    async def one(i: int) -> bool:
        replica, key = replicas[i % 2], keys[i % 2]
        request = ask(key, i)
        try:
            admission = await replica.admit(key, request)
        except InsufficientQuota:
            return False
        await asyncio.sleep(0.01)
        end(replica, request, admission, completion=MAX_OUTPUT)  # each costs its maximum
        return True

    try:
        results = await asyncio.gather(*(one(i) for i in range(80)))
        assert 10 <= sum(results) <= 11, results
        for replica in replicas:
            assert await replica.outbox.drain(timeout_s=10.0)
            await replica.admission.give_back()
    finally:
        for task in outboxes:
            task.cancel()
    spent, reserved = billed.spent_and_reserved(keys[0])
    assert reserved == 0 and spent == sum(results) * MAX_COST_NANO <= budget_nano + MAX_COST_NANO


async def test_a_lease_goes_back_only_once_its_usage_is_recorded(billed: Billed) -> None:
    replica = billed.replica()  # its outbox is flushed by hand here
    key = await verified(replica, billed.key(budget_dkk="5"))
    request = ask(key)
    admission = await replica.admit(key, request)
    assert admission.lease_id is not None and admission.reserved_nano_dkk == MAX_COST_NANO
    end(replica, request, admission, completion=3)
    await replica.admission.give_back()
    _, reserved = billed.spent_and_reserved(key)
    assert reserved > 0  # the report is not recorded yet: the lease stays, or its request's cost could be lost
    assert await replica.outbox.flush_once() == 1
    await replica.admission.give_back()
    spent, reserved = billed.spent_and_reserved(key)
    assert reserved == 0 and spent == PROMPT * PRICES.input_uncached_nano_dkk + 3 * PRICES.output_nano_dkk


async def test_usage_batches_that_arrive_together_are_written_together_and_a_bad_one_fails_alone(
    billed: Billed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15 (scale): usage batches that reach billing while it writes are written together, one transaction for
    all (a group commit), and each sender is acknowledged its own batch; the budget settles their sum. A batch the
    ledger cannot take (here, a time without a zone, which no replica sends) fails only its own sender."""
    key = await verified(billed.replica(), billed.key(budget_dkk="5"))
    written: list[int] = []  # events per ledger transaction
    record_new = billed.service.ledger.record_new

    def counted(events: list[UsageEvent], leases: dict[str, str] | None = None) -> Any:
        written.append(len(events))
        return record_new(events, leases)

    monkeypatch.setattr(billed.service.ledger, "record_new", counted)
    batches = [[UsageReport(finished(ask(key, 10 * b + i), 2)) for i in range(10)] for b in range(4)]
    acked = await asyncio.gather(*(billed.handle.record.remote(batch) for batch in batches))
    assert acked == [[r.event.request_id for r in batch] for batch in batches]
    assert written == [40]
    spent, _ = billed.spent_and_reserved(key)
    each = PROMPT * PRICES.input_uncached_nano_dkk + 2 * PRICES.output_nano_dkk
    assert spent == 40 * each

    written.clear()
    good = [UsageReport(finished(ask(key, 100 + i), 2)) for i in range(3)]
    naive = replace(finished(ask(key, 200)), started_at=datetime(2026, 12, 7))
    answers = await asyncio.gather(
        billed.handle.record.remote(good), billed.handle.record.remote([UsageReport(naive)]), return_exceptions=True
    )
    assert answers[0] == [r.event.request_id for r in good] and isinstance(answers[1], ValueError), answers
    assert written == [4, 3, 1]  # together, then each alone
    assert billed.spent_and_reserved(key)[0] == spent + 3 * each


async def test_a_lease_its_replica_stops_renewing_lapses_and_is_never_spent(billed: Billed) -> None:
    replica = billed.replica()
    key = await verified(replica, billed.key(budget_dkk="5"))
    await replica.admit(key, ask(key))  # then the replica dies mid-request: nothing reports, nothing renews
    assert billed.spent_and_reserved(key)[1] > 0
    later = datetime.now(UTC) + timedelta(seconds=billed.service._spec.lease_ttl_s + 1)
    assert await billed.service.release_expired(later) == 1
    assert billed.spent_and_reserved(key) == (0, 0)


async def test_a_long_request_keeps_its_lease_alive(billed: Billed, replica: ServeBillingClient) -> None:
    from deployments.billing.tables import BUDGET_LEASES

    clock = [1000.0]
    replica.admission._clock = lambda: clock[0]
    key = await verified(replica, billed.key(budget_dkk="5"))
    admission = await replica.admit(key, ask(key))

    def expires_at() -> datetime:
        with billed.service.ledger.engine.connect() as db:
            return db.execute(BUDGET_LEASES.select()).one().expires_at  # type: ignore[no-any-return]

    before = expires_at()
    clock[0] += billed.service._spec.lease_ttl_s * 0.6  # the stream runs on past half the lease's life
    await asyncio.sleep(0.01)
    await replica.admission.upkeep_once()
    assert expires_at() > before
    assert admission.lease_id in {lease for state in replica.admission._keys.values() for lease in state.leases}


async def test_a_client_that_leaves_during_a_top_up_loses_nothing_of_the_slice(billed: Billed) -> None:
    slow = InProcessHandleDouble(SlowLease(billed.billing))
    replica = ServeBillingClient(slow, key_cache_ttl_s=60.0, flush_interval_s=0.05)  # type: ignore[arg-type]
    key = await verified(replica, billed.key(budget_dkk="5"))
    leaving = asyncio.create_task(replica.admit(key, ask(key, 1)))
    await asyncio.sleep(0.05)  # the top-up is under way
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    await asyncio.sleep(0.3)  # the top-up ends after its client left
    await replica.admit(key, ask(key, 2))
    assert replica.admission.lease_calls == 1  # the slice the leaver's top-up brought serves the next request
    [state] = replica.admission._keys.values()
    assert state.current is not None and state.current.in_flight == 1


class SlowLease:
    """The billing deployment, answering ``lease`` after a delay (everything else as it is)."""

    def __init__(self, billing: Any) -> None:
        self._billing = billing

    def __getattr__(self, name: str) -> Any:
        return getattr(self._billing, name)

    async def lease(self, *args: Any) -> Any:
        await asyncio.sleep(0.2)
        return await self._billing.lease(*args)


KEY_TTL_S = 10.0  # the replicas' key cache's life in the tests below, on a clock of their own


def clocked(billed: Billed, clock: list[float]) -> ServeBillingClient:
    """A replica's billing client whose key cache and admission run on ``clock`` (seconds), which the test moves."""
    return ServeBillingClient(
        billed.handle,  # type: ignore[arg-type]
        key_cache_ttl_s=KEY_TTL_S,
        flush_interval_s=0.05,
        clock=lambda: clock[0],
    )


async def test_while_billing_is_away_a_revoked_key_works_no_longer_than_the_key_caches_life(billed: Billed) -> None:
    clock = [1000.0]
    replica = clocked(billed, clock)
    raw = billed.key()
    record = await verified(replica, raw)
    billed.service.governance.revoke_key(Actor.operator("test"), record.key_id)
    billed.handle.down = True
    clock[0] += KEY_TTL_S - 0.5
    assert await replica.verify(raw) == record  # billing vouched for it that recently: trusted, revoked or not
    clock[0] += 0.5
    with pytest.raises(BillingUnavailable):  # then no one here can say it is still valid: 503, not served
        await replica.verify(raw)
    billed.handle.down = False
    assert await replica.verify(raw) is None


async def test_the_key_check_comes_when_billing_can_give_it_and_stays_while_billing_is_away(billed: Billed) -> None:
    """A replica that started while billing was away looks well-formed keys up (503 meanwhile); billing's key check
    is asked for again within seconds, then refuses made-up keys in process, kept while billing is away again, and
    renewed every few minutes: a key made before tags and revoked since leaves its set."""
    from deployments.billing.client import KEY_CHECK_RETRY_S, KEY_CHECK_TTL_S
    from deployments.keys import TAG_DIGITS, checksummed

    clock = [1000.0]
    replica = clocked(billed, clock)
    raw = billed.key()
    made_up = checksummed(raw[:-TAG_DIGITS])  # a real key's id, in a shape before tags
    calls = billed.handle.calls
    billed.handle.down = True
    with pytest.raises(BillingUnavailable):  # no key check yet: asked of billing, which is away
        await replica.verify(made_up)
    assert calls["key_check"] == 1 and calls["authenticate"] == 1
    billed.handle.down = False
    clock[0] += KEY_CHECK_RETRY_S - 0.1
    assert await replica.verify(made_up) is None  # not asked for the check again yet: the key is looked up
    assert calls["key_check"] == 1 and calls["authenticate"] == 2
    clock[0] += 0.1
    assert await replica.verify(made_up) is None  # remembered as unknown for a while: no call at all
    assert calls["key_check"] == 1 and calls["authenticate"] == 2
    assert await replica.verify(checksummed("ank_0123456789ab_" + "C" * 43)) is None
    assert calls["key_check"] == 2 and calls["authenticate"] == 2  # the check came, and refused it in process
    billed.handle.down = True
    assert await replica.verify(checksummed("ank_0123456789ac_" + "C" * 43)) is None  # the check held is used
    assert await replica.verify(raw[:-1] + ("B" if raw[-1] == "A" else "A")) is None
    assert calls["authenticate"] == 2
    billed.handle.down = False
    # A key made before tags, then revoked: in the check until it is asked for again.
    untagged = billed.key()
    old = checksummed(untagged[:-TAG_DIGITS])
    store = billed.service.keys
    with store.engine.begin() as db:
        where = API_KEYS.c.key_id == untagged.split("_")[1]
        db.execute(API_KEYS.update().where(where).values(key_hmac=store._digest(old), tagged=False))
    clock[0] += KEY_CHECK_TTL_S
    assert await verified(replica, old) is not None and calls["key_check"] == 3
    store.revoke(untagged.split("_")[1])
    clock[0] += KEY_CHECK_TTL_S
    assert await replica.verify(old) is None and calls["key_check"] == 4
    assert calls["authenticate"] == 3  # the old key's one look-up; its revocation came with the check


async def test_while_billing_is_away_a_key_without_budget_meets_its_limits_on_the_replica(billed: Billed) -> None:
    clock = [1000.0]
    replica = clocked(billed, clock)
    by_requests = billed.key(rpm=2)
    by_tokens = billed.key(tpm=3 * (PROMPT + MAX_OUTPUT) - 1)  # two requests' prompt and max output, not three
    keys = {by_requests: await verified(replica, by_requests), by_tokens: await verified(replica, by_tokens)}
    capped = await verified(replica, billed.key(budget_dkk="5"))
    billed.handle.down = True
    for raw, refusal in ((by_requests, RateLimited), (by_tokens, TokenRateLimited)):
        key = keys[raw]
        for n in range(2):
            admission = await replica.admit(key, ask(key, n))
            limits = admission.rate_limit_headers
            assert admission.fallback and limits["x-ratelimit-limit-requests"] == str(key.rpm or 600)
        with pytest.raises(RateLimited) as refused:
            await replica.admit(key, ask(key, 2))
        assert type(refused.value) is refusal and refused.value.retry_after_s >= 1
    with pytest.raises(BillingUnavailable):  # a budget is never spent without a lease
        await replica.admit(capped, ask(capped))
    clock[0] += KEY_TTL_S  # past the key cache's life, billing still away: no key is trusted any more
    for raw in keys:
        with pytest.raises(BillingUnavailable):
            await replica.verify(raw)
