"""The billing actor as a serving replica sees it: cached key look-ups, admission from leases
(``deployments/billing/admission.py``), usage through the outbox, and the read and admin calls, over a deployment
handle. The engine replicas and the control application use it alike.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from ray.serve.handle import DeploymentHandle

from deployments.billing.admission import LocalAdmission
from deployments.billing.governance import Actor
from deployments.contracts import (
    Admission,
    AdmissionRequest,
    LeaseAsk,
    LeaseGrant,
    LeaseUpkeep,
    Principal,
    UpkeepResult,
    UsageReport,
)
from deployments.errors import AnkerError, BillingUnavailable
from deployments.keys import KeyRecord
from deployments.usage_outbox import UsageOutbox

logger = logging.getLogger("ray.serve")


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
        self._cache: dict[str, tuple[float, Principal]] = {}
        self._principals: dict[str, Principal] = {}  # by key id, as last verified
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
        """Valid keys are cached, misses never (a new key works at once). A valid key is trusted for
        ``key_cache_ttl_s`` after billing last said so, whether billing is up or away: a revoked key stops working
        within that time; after it, while billing is away, the key's requests get 503."""
        hit = self._cache.get(key)
        now = self._clock()
        if hit is not None and hit[0] > now:
            return hit[1].key
        principal: Principal | None = await self._call("authenticate", key)
        if principal is None:
            self._cache.pop(key, None)
            return None
        if len(self._cache) > 10_000:
            self._cache.clear()
            self._principals.clear()
        self._cache[key] = (now + self._ttl_s, principal)
        self._principals[principal.key.key_id] = principal
        return principal.key

    async def is_admin_token(self, token: str) -> bool:
        return bool(await self._call("is_admin_token", token))

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

    async def usage(self, key: KeyRecord, start: datetime, end: datetime, group_by: str | None) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("usage", key, start, end, group_by)
        return result

    async def summary(self, key: KeyRecord) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("summary", key)
        return result

    async def administer(self, actor: Actor, operation: str, arguments: dict[str, Any]) -> Any:
        return await self._call("administer", actor, operation, arguments)
