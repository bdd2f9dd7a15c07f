"""Admission in the engine replica, from leases: each key's slice of its rate limits and of its budgets, granted by
the billing actor for many requests at once, so that a request waits for the actor only when its key's slice has
run out. Idle slices go back, leases in use are kept alive, about once a second, in one call for the replica.

It holds counts, amounts and ids, never content. The billing actor stays the one source of truth: it grants no more
than a key's limits and budgets allow (``deployments/billing/ratelimit.py``, ``budgets.py``), and what a replica
holds when it dies lapses there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from deployments.billing.ledger import UsageEvent, charge
from deployments.billing.pricing import LEASE_REQUESTS, TokenPrices, worst_case_nano_dkk
from deployments.billing.ratelimit import WINDOW_S, LimitState, RateLimiter, too_large
from deployments.contracts import (
    Admission,
    AdmissionRequest,
    BudgetAsk,
    LeaseAsk,
    LeaseGrant,
    LeaseUpkeep,
    LimitSnapshot,
    Principal,
    SliceReturn,
    UpkeepResult,
)
from deployments.errors import BillingUnavailable

logger = logging.getLogger("ray.serve")

IDLE_S = 2.0  # permits and leases unused this long go back to the billing actor
UPKEEP_PERIOD_S = 1.0
SLICE_S = 3.0  # a slice of requests or tokens asked for: what the key's limit allows in this long
TOP_UPS = 3  # calls one request may make while smaller requests of its key take what each brought

Lease = Callable[[Principal, LeaseAsk], Awaitable[LeaseGrant]]  # raises BillingUnavailable when billing is away
Upkeep = Callable[[LeaseUpkeep], Awaitable[UpkeepResult]]


@dataclass
class _Lease:
    """One budget lease of a key, held by this replica."""

    lease_id: str
    balance_nano_dkk: int
    prices: TokenPrices
    expires_at: float  # monotonic
    ttl_s: float
    used_at: float
    in_flight: int = 0

    def usable(self, now: float) -> bool:
        # Drawn from only well before it lapses at the actor, so the actor's sweep never races a request.
        return now < self.expires_at - self.ttl_s / 3


@dataclass
class _Key:
    """One key's share of its rate limits and its budget leases on this replica."""

    rpm: int
    tpm: int
    requests: int = 0  # permits held
    tokens: int = 0
    snapshot: LimitSnapshot | None = None  # the actor's bucket at its last grant, for the headers
    snapshot_at: float = 0.0
    used_at: float = 0.0
    leases: dict[str, _Lease] = field(default_factory=dict)
    current: _Lease | None = None  # where new requests draw from; an older one only settles
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class LocalAdmission:
    """The replica's admission (``admit``) and its return of what a request did not use (``finish``)."""

    def __init__(
        self,
        lease: Lease,
        upkeep: Upkeep,
        pending_leases: Callable[[], set[str]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lease = lease
        self._upkeep = upkeep
        self._pending_leases = pending_leases  # leases with usage not yet acknowledged: never given back early
        self._clock = clock
        self._keys: dict[str, _Key] = {}
        self._prices: TokenPrices | None = None  # this replica's model's, from the last grant
        self._fallback = RateLimiter(clock)  # each key's limits on this replica alone, while billing is away
        self.lease_calls = 0  # calls to the actor on the request path (a key's slice ran out), for tests and metrics

    # -- the request path -------------------------------------------------------------------------------------------

    async def admit(self, principal: Principal, request: AdmissionRequest) -> Admission:
        """Admits the request from its key's slice, topping the slice up from the billing actor first if it has run
        out; raises an ``AnkerError`` (429 rate limit or quota, 503 billing unavailable) to refuse it."""
        if request.tokens > principal.tpm:
            raise too_large(principal.tpm, request.tokens)
        state = self._key(principal)
        admission = self._take(state, principal, request)
        if admission is not None:
            return admission
        # The top-up and the take run as one task: a client that leaves meanwhile loses nothing of the key's slice.
        topping_up = asyncio.get_running_loop().create_task(self._top_up(state, principal, request))
        try:
            return await asyncio.shield(topping_up)
        except asyncio.CancelledError:
            topping_up.add_done_callback(lambda task: self._untake_done(state, principal, task))
            raise

    def finish(self, admission: Admission, event: UsageEvent) -> None:
        """The request has ended: the tokens per minute and the part of its maximum cost it did not use go back to
        its key's slice on this replica."""
        state = self._keys.get(event.key_id)
        if state is None:
            return
        unused_tokens = admission.reserved_tokens - event.prompt_tokens - event.completion_tokens
        if unused_tokens > 0:
            if admission.fallback:
                self._fallback.refund(event.key_id, unused_tokens)
            else:
                state.tokens += unused_tokens
        lease = state.leases.get(admission.lease_id) if admission.lease_id else None
        if lease is not None:
            lease.in_flight -= 1
            lease.balance_nano_dkk += admission.reserved_nano_dkk - charge(event, lease.prices).total_nano_dkk
            lease.used_at = self._clock()

    def headers(self, key_id: str) -> dict[str, str] | None:
        """The key's rate-limit headers as this replica knows them, or None if it holds nothing of the key."""
        state = self._keys.get(key_id)
        return None if state is None or state.snapshot is None else self._headers(state)

    def _key(self, principal: Principal) -> _Key:
        state = self._keys.get(principal.key.key_id)
        if state is None:
            state = self._keys[principal.key.key_id] = _Key(principal.rpm, principal.tpm)
        state.rpm, state.tpm = principal.rpm, principal.tpm
        return state

    def _take(self, state: _Key, principal: Principal, request: AdmissionRequest) -> Admission | None:
        """The request admitted from what the replica holds of its key, or None if that is not enough. Synchronous,
        so nothing else runs between the check and the take."""
        now = self._clock()
        if state.requests < 1 or state.tokens < request.tokens:
            return None
        lease: _Lease | None = None
        worst_nano = 0
        if principal.has_budget:
            lease = state.current
            if lease is None or not lease.usable(now):
                return None
            worst_nano = worst_case_nano_dkk(lease.prices, request.prompt_tokens, request.max_output_tokens)
            if lease.balance_nano_dkk < worst_nano:
                return None
            lease.balance_nano_dkk -= worst_nano
            lease.in_flight += 1
            lease.used_at = now
        state.requests -= 1
        state.tokens -= request.tokens
        state.used_at = now
        lease_id = lease.lease_id if lease is not None else None
        return Admission(self._headers(state), request.tokens, lease_id, worst_nano)

    async def _top_up(self, state: _Key, principal: Principal, request: AdmissionRequest) -> Admission:
        async with state.lock:  # one call per key at a time; the requests behind it find the slice topped up
            for _ in range(TOP_UPS):
                admission = self._take(state, principal, request)
                if admission is not None:
                    return admission
                ask = self._ask(state, principal, request)
                self.lease_calls += 1
                try:
                    grant = await self._lease(principal, ask)
                except BillingUnavailable:
                    if ask.budget is not None:  # a budget is never spent without a lease
                        raise
                    return self._admit_alone(state, principal, request)
                self._apply(state, grant)
                if grant.refusal is not None:
                    raise grant.refusal
            # Each top-up covered what the request lacked, and each time smaller requests took it meanwhile.
            raise BillingUnavailable("Billing is briefly unavailable. Please retry shortly.", retry_after_s=1)

    def _ask(self, state: _Key, principal: Principal, request: AdmissionRequest) -> LeaseAsk:
        """What the waiting request lacks, and a slice for the requests after it."""
        now = self._clock()
        budget: BudgetAsk | None = None
        lease = state.current
        if principal.has_budget:
            prices = lease.prices if lease is not None else self._prices
            worst = worst_case_nano_dkk(prices, request.prompt_tokens, request.max_output_tokens) if prices else 0
            held = lease.balance_nano_dkk if lease is not None and lease.usable(now) else 0
            if held < worst or not worst:
                current = lease.lease_id if lease is not None and lease.usable(now) else None
                budget = BudgetAsk(
                    current, worst - held, worst * LEASE_REQUESTS, request.prompt_tokens, request.max_output_tokens
                )
        need_requests = max(0, 1 - state.requests)
        need_tokens = max(0, request.tokens - state.tokens)
        if not need_requests and not need_tokens:
            return LeaseAsk(request.model, 0, 0, 0, 0, budget, request.trace)
        return LeaseAsk(
            request.model,
            need_requests,
            need_tokens,
            max(need_requests, math.floor(state.rpm * SLICE_S / WINDOW_S)),
            max(need_tokens, math.floor(state.tpm * SLICE_S / WINDOW_S)),
            budget,
            request.trace,
        )

    def _apply(self, state: _Key, grant: LeaseGrant) -> None:
        now = self._clock()
        state.requests += grant.requests
        state.tokens += grant.tokens
        state.snapshot, state.snapshot_at = grant.limits, now
        if grant.prices is not None:
            self._prices = grant.prices
        if grant.lease_id is None or grant.prices is None:
            return
        lease = state.leases.get(grant.lease_id)
        if lease is None:
            lease = _Lease(grant.lease_id, 0, grant.prices, now + grant.lease_ttl_s, grant.lease_ttl_s, now)
            state.leases[grant.lease_id] = lease
        lease.balance_nano_dkk += grant.lease_nano_dkk
        lease.prices = grant.prices
        lease.expires_at, lease.ttl_s, lease.used_at = now + grant.lease_ttl_s, grant.lease_ttl_s, now
        state.current = lease

    def _admit_alone(self, state: _Key, principal: Principal, request: AdmissionRequest) -> Admission:
        """Billing is away and the key has no budget: its limits hold on this replica alone until billing is back."""
        limits = self._fallback.admit(principal.key.key_id, principal.rpm, principal.tpm, request.tokens)
        state.used_at = self._clock()
        return Admission(limits.headers(), request.tokens, None, 0, fallback=True)

    def _untake_done(self, state: _Key, principal: Principal, task: asyncio.Task[Admission]) -> None:
        """A top-up whose client left: the admission it took goes back to the key's slice."""
        if task.cancelled() or task.exception() is not None:
            return
        admission = task.result()
        if admission.fallback:
            self._fallback.refund(principal.key.key_id, admission.reserved_tokens, request=True)
            return
        state.requests += 1
        state.tokens += admission.reserved_tokens
        lease = state.leases.get(admission.lease_id) if admission.lease_id else None
        if lease is not None:
            lease.in_flight -= 1
            lease.balance_nano_dkk += admission.reserved_nano_dkk

    def _headers(self, state: _Key) -> dict[str, str]:
        """OpenAI's headers for the key: what the actor's bucket held at its last grant, refilled since, and what
        this replica holds."""
        snapshot = state.snapshot
        now = self._clock()
        if snapshot is None:
            return {}
        refill = (now - state.snapshot_at) / WINDOW_S
        requests = min(snapshot.rpm, snapshot.requests_left + refill * snapshot.rpm + state.requests)
        tokens = min(snapshot.tpm, snapshot.tokens_left + refill * snapshot.tpm + state.tokens)
        return LimitState(
            snapshot.rpm,
            max(0, math.floor(requests)),
            (snapshot.rpm - requests) * WINDOW_S / snapshot.rpm,
            snapshot.tpm,
            max(0, math.floor(tokens)),
            (snapshot.tpm - tokens) * WINDOW_S / snapshot.tpm,
        ).headers()

    # -- upkeep ------------------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Upkeep forever, about once a second."""
        while True:
            await asyncio.sleep(UPKEEP_PERIOD_S)
            with contextlib.suppress(Exception):  # billing away: leases lapse on their own, nothing is lost
                await self.upkeep_once()

    async def give_back(self) -> None:
        """Gives back everything no request is using, at once: the replica is stopping (after its outbox drained),
        or a test wants the budgets as billing sees them. Raises what the call raised."""
        await self.upkeep_once(everything=True)

    async def upkeep_once(self, everything: bool = False) -> None:
        """Keeps leases in use alive; gives back idle leases whose usage billing has (their whole remaining amount)
        and idle permits (with ``everything``, all that no request uses). Raises what the call raised."""
        now = self._clock()
        idle_s = 0.0 if everything else IDLE_S
        pending = self._pending_leases()
        renew: list[str] = []
        release: list[str] = []
        slices: list[SliceReturn] = []
        for key_id, state in list(self._keys.items()):
            idle = now - state.used_at >= idle_s
            if idle and (state.requests or state.tokens):
                slices.append(SliceReturn(key_id, state.requests, state.tokens))
                state.requests = state.tokens = 0
            for lease in list(state.leases.values()):
                lease_idle = lease.in_flight == 0 and now - lease.used_at >= idle_s
                if lease_idle and lease.lease_id not in pending:
                    release.append(lease.lease_id)
                    self._forget(state, lease)
                elif lease_idle and now >= lease.expires_at:
                    self._forget(state, lease)  # lapsed at the actor; its usage still settles there
                elif lease.expires_at - now < lease.ttl_s / 2:
                    renew.append(lease.lease_id)
            if idle and not state.leases and not state.requests and not state.tokens and not state.lock.locked():
                del self._keys[key_id]  # nothing held: its headers come from the actor again
        if not (renew or release or slices):
            return
        result = await self._upkeep(LeaseUpkeep(tuple(renew), tuple(release), tuple(slices)))
        renewed = set(result.renewed)
        for state in self._keys.values():
            for lease in list(state.leases.values()):
                if lease.lease_id in renewed:
                    lease.expires_at, lease.ttl_s = self._clock() + result.ttl_s, result.ttl_s
                elif lease.lease_id in renew:  # lapsed at the actor: nothing more is drawn from it
                    lease.expires_at = now
                    if state.current is lease:
                        state.current = None

    @staticmethod
    def _forget(state: _Key, lease: _Lease) -> None:
        del state.leases[lease.lease_id]
        if state.current is lease:
            state.current = None
