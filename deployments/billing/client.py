"""The billing actor as a serving replica sees it: cached key look-ups, admission from leases
(``deployments/billing/admission.py``), usage through the outbox, and the read and admin calls, over a deployment
handle. The engine replicas and the control application use it alike.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

from ray.serve.handle import DeploymentHandle

from deployments.billing.admission import LocalAdmission
from deployments.billing.governance import Actor
from deployments.contracts import (
    Admission,
    AdmissionRequest,
    KeyCheck,
    LeaseAsk,
    LeaseGrant,
    LeaseUpkeep,
    Principal,
    UpkeepResult,
    UsageReport,
)
from deployments.errors import AnkerError, BillingUnavailable
from deployments.keys import ADMIN_TOKEN_PATTERN, KeyRecord, key_id_of
from deployments.usage_outbox import UsageOutbox

logger = logging.getLogger("ray.serve")

KNOWN_KEYS = 10_000  # valid keys a replica keeps billing's word on, the oldest forgotten first
UNKNOWN_KEYS = 10_000  # keys and tokens billing refused, kept as long, so that a bogus one costs one call
UNKNOWN_TTL_S = 30.0  # how long a refusal is kept (no key becomes valid later: keys are random, revocation final)
KEY_CHECK_TTL_S = 300.0  # how often billing's ``KeyCheck`` is asked again (its set of older keys only shrinks)
KEY_CHECK_RETRY_S = 5.0  # how soon it is asked again after billing could not answer
_KEY_CHECK = "\x00key-check"  # its look-up's name among the keys'; no key or token has this shape

V = TypeVar("V")


async def call_deployment(handle: DeploymentHandle, method: str, args: tuple[Any, ...], unavailable: AnkerError) -> Any:
    """A handle call whose Ray failure becomes ``unavailable`` and whose returned error value is raised."""
    try:
        result = await getattr(handle, method).remote(*args)
    except Exception as exc:
        logger.error("%s call failed with %s", method, type(exc).__name__)
        raise unavailable from None
    if isinstance(result, AnkerError):
        raise result
    return result


class _Expiring(Generic[V]):
    """At most ``size`` entries, each until its own deadline; when full, the oldest entry goes first."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: OrderedDict[str, tuple[float, V]] = OrderedDict()

    def get(self, name: str, now: float) -> V | None:
        entry = self._entries.get(name)
        if entry is None:
            return None
        if entry[0] <= now:
            del self._entries[name]
            return None
        return entry[1]

    def put(self, name: str, value: V, until: float) -> None:
        self._entries.pop(name, None)
        self._entries[name] = (until, value)
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)


class ServeBillingClient:
    """The billing actor as a replica sees it: cached key look-ups, admission from leases, usage through the
    outbox, and the read and admin calls. Ray errors become ``BillingUnavailable``; error values from the actor are
    raised.

    If the actor is briefly away (Ray Serve is restarting it), keys cached here keep working for the rest of their
    cache's life, and no longer (``verify``); such a key is admitted from what this replica holds of its limits and
    budget lease; beyond that a key without any budget meets its limits on this replica alone (its usage waits in
    the outbox), and a key with a budget gets 503: a budget is never spent without a lease.
    """

    def __init__(
        self,
        handle: DeploymentHandle,
        key_cache_ttl_s: float,
        flush_interval_s: float,
        spool_dir: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._handle = handle
        self._ttl_s = key_cache_ttl_s
        self._clock = clock
        self._known: _Expiring[Principal] = _Expiring(KNOWN_KEYS)
        self._unknown: _Expiring[bool] = _Expiring(UNKNOWN_KEYS)
        self._asking: dict[str, asyncio.Task[Any]] = {}  # billing's look-ups under way, by the key or token
        self._principals: dict[str, Principal] = {}  # by key id, as last verified (valid keys only: a bounded set)
        self._check: KeyCheck | None = None  # billing's, to refuse made-up keys in process
        self._check_due = 0.0  # when to ask for it (again)
        self.outbox = UsageOutbox(self._send, flush_interval_s, spool_dir=spool_dir)
        self.admission = LocalAdmission(self._lease, self._upkeep, self.outbox.pending_leases, clock)

    async def _call(self, method: str, *args: Any) -> Any:
        unavailable = BillingUnavailable("Billing is briefly unavailable. Please retry shortly.", retry_after_s=2)
        return await call_deployment(self._handle, method, args, unavailable)

    async def _send(self, reports: Sequence[UsageReport]) -> Sequence[str]:
        acked: Sequence[str] = await self._handle.record.remote(list(reports))
        return acked

    async def _lease(self, principal: Principal, ask: LeaseAsk) -> LeaseGrant:
        grant: LeaseGrant = await self._call("lease", principal.key, ask)
        return grant

    async def _upkeep(self, upkeep: LeaseUpkeep) -> UpkeepResult:
        result: UpkeepResult = await self._handle.upkeep.remote(upkeep)
        return result

    async def verify(self, key: str) -> KeyRecord | None:
        """The key's record, or None if it is no valid key.

        Billing's word on a key is kept: a valid key is trusted for ``key_cache_ttl_s`` after billing last said so,
        whether billing is up or away (a revoked key stops working within that time; after it, while billing is
        away, the key's requests get 503), and a key billing refused is refused here for ``UNKNOWN_TTL_S`` without
        asking again. A key that cannot be one billing made costs no call at all: one not shaped like a key, or
        whose checksum is wrong, or, once billing's ``KeyCheck`` is here, whose tag is wrong or (of the shapes
        before tags) whose id is not that of such a key. Until that check is here (billing away since this replica
        started), a key of the right shape is asked about, once.
        """
        if key_id_of(key) is None:
            return None
        now = self._clock()
        known = self._known.get(key, now)
        if known is not None:
            return known.key
        if self._unknown.get(key, now):
            return None
        check = await self._key_check(now)
        if check is not None and not check.may_be_valid(key):
            return None
        principal: Principal | None = await self._once(key, self._authenticate)
        return principal.key if principal is not None else None

    async def _key_check(self, now: float) -> KeyCheck | None:
        """Billing's ``KeyCheck``, asked for every ``KEY_CHECK_TTL_S``. The one held stays in use meanwhile and
        while billing cannot answer: its tag key does not change, and its older keys only go away."""
        if now >= self._check_due:
            try:
                await self._once(_KEY_CHECK, self._ask_key_check)
            except AnkerError:
                self._check_due = self._clock() + KEY_CHECK_RETRY_S
        return self._check

    async def _ask_key_check(self, _name: str) -> None:
        self._check = await self._call("key_check")
        self._check_due = self._clock() + KEY_CHECK_TTL_S

    async def _authenticate(self, key: str) -> Principal | None:
        asked_at = self._clock()  # the key's cache life counts from before billing looked, never longer
        principal: Principal | None = await self._call("authenticate", key)
        if principal is None:
            self._unknown.put(key, True, asked_at + UNKNOWN_TTL_S)
            return None
        self._known.put(key, principal, asked_at + self._ttl_s)
        self._principals[principal.key.key_id] = principal
        return principal

    async def is_admin_token(self, token: str) -> bool:
        """Whether ``token`` is the operator's admin token: never one not shaped like it. Told in process from
        billing's ``KeyCheck`` (a token changed with billing's restart is taken within ``KEY_CHECK_TTL_S``); until
        that is here, asked of billing, and a refused one is remembered for a while (without a call, as for keys)."""
        now = self._clock()
        if ADMIN_TOKEN_PATTERN.fullmatch(token) is None or self._unknown.get(token, now):
            return False
        check = await self._key_check(now)
        if check is not None:
            return check.is_admin_token(token)
        return bool(await self._once(token, self._is_admin_token))

    async def _is_admin_token(self, token: str) -> bool:
        asked_at = self._clock()
        if await self._call("is_admin_token", token):
            return True
        self._unknown.put(token, True, asked_at + UNKNOWN_TTL_S)
        return False

    async def _once(self, token: str, ask: Callable[[str], Coroutine[Any, Any, V]]) -> V:
        """``ask(token)``, one call at a time per token: the requests that bring it meanwhile share its answer, so a
        burst of one bogus key costs one call too. A client that leaves does not cancel it for the others."""
        asking = self._asking.get(token)
        if asking is None:
            asking = asyncio.get_running_loop().create_task(ask(token))
            self._asking[token] = asking
            asking.add_done_callback(lambda done: self._asked(token, done))
        answer: V = await asyncio.shield(asking)
        return answer

    def _asked(self, token: str, done: asyncio.Task[Any]) -> None:
        del self._asking[token]
        if not done.cancelled():
            done.exception()  # retrieved, so that no one is warned of it when every client waiting for it has left

    async def rate_limit_headers(self, key: KeyRecord) -> dict[str, str]:
        """The key's headers from what this replica holds of it, else from the actor."""
        known = self.admission.headers(key.key_id)
        if known is not None:
            return known
        headers: dict[str, str] = await self._call("rate_limit_headers", key)
        return headers

    async def admit(self, key: KeyRecord, request: AdmissionRequest) -> Admission:
        """Admits a request of a key ``verify`` has seen, from its leases on this replica."""
        return await self.admission.admit(self._principals[key.key_id], request)

    def submit(self, report: UsageReport, admission: Admission | None = None) -> None:
        """Queues the report of a request that has ended; what its admission took and it did not use goes back."""
        if admission is not None:
            self.admission.finish(admission, report.event)
        self.outbox.submit(report)

    def progress(self, report: UsageReport) -> None:
        """Notes how far a stream has been delivered, for the replica that adopts this one's spool if it dies."""
        self.outbox.progress(report)

    async def usage(self, key: KeyRecord, start: datetime, end: datetime, group_by: str | None) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("usage", key, start, end, group_by)
        return result

    async def summary(self, key: KeyRecord) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("summary", key)
        return result

    async def administer(self, actor: Actor, operation: str, arguments: dict[str, Any]) -> Any:
        return await self._call("administer", actor, operation, arguments)
