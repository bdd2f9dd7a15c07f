"""The billing actor as a serving replica sees it: cached key look-ups, admission, usage through the outbox, and
the read and admin calls, over a deployment handle. The engine replicas and the control application use it alike.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from ray.serve.handle import DeploymentHandle

from deployments.billing.governance import Actor
from deployments.billing.service import Principal, UsageReport
from deployments.contracts import Admission, AdmissionRequest
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
    """The billing actor as the ingress sees it: cached key look-ups, admission, usage through the outbox, and the
    read and admin calls. Ray errors become ``BillingUnavailable``; error values from the actor are raised.

    If the actor is briefly away (Ray Serve is restarting it), keys cached here keep working, a key without any
    budget is admitted without a reservation (its usage waits in the outbox), and a key with a budget gets 503:
    a budget is never spent without its reservation.
    """

    def __init__(
        self,
        handle: DeploymentHandle,
        key_cache_ttl_s: float,
        flush_interval_s: float,
        spool_dir: Path | None = None,
    ) -> None:
        self._handle = handle
        self._ttl_s = key_cache_ttl_s
        self._cache: dict[str, tuple[float, Principal]] = {}
        self._has_budget: dict[str, bool] = {}
        self.outbox = UsageOutbox(self._send, flush_interval_s, spool_dir=spool_dir)

    async def _call(self, method: str, *args: Any) -> Any:
        unavailable = BillingUnavailable("Billing is briefly unavailable. Please retry shortly.", retry_after_s=2)
        return await call_deployment(self._handle, method, args, unavailable)

    async def _send(self, reports: Sequence[UsageReport]) -> Sequence[str]:
        acked: Sequence[str] = await self._handle.record.remote(list(reports))
        return acked

    async def verify(self, key: str) -> KeyRecord | None:
        """Valid keys are cached briefly, misses never (a new key works at once; a revoked one within the TTL)."""
        hit = self._cache.get(key)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1].key
        try:
            principal: Principal | None = await self._call("authenticate", key)
        except BillingUnavailable:
            if hit is not None:  # stale but known: keep serving while billing restarts
                return hit[1].key
            raise
        if principal is None:
            self._cache.pop(key, None)
            return None
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[key] = (now + self._ttl_s, principal)
        self._has_budget[principal.key.key_id] = principal.has_budget
        return principal.key

    async def is_admin_token(self, token: str) -> bool:
        return bool(await self._call("is_admin_token", token))

    async def rate_limit_headers(self, key: KeyRecord) -> dict[str, str]:
        headers: dict[str, str] = await self._call("rate_limit_headers", key)
        return headers

    async def admit(self, key: KeyRecord, request: AdmissionRequest) -> Admission:
        try:
            admission: Admission = await self._call("admit", key, request)
        except BillingUnavailable:
            if self._has_budget.get(key.key_id, True):
                raise
            logger.warning("billing unavailable: admitting a request of key %s without a budget", key.key_id)
            return Admission({}, 0, False)
        return admission

    def submit(self, report: UsageReport) -> None:
        self.outbox.submit(report)

    async def usage(self, key: KeyRecord, start: datetime, end: datetime, group_by: str | None) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("usage", key, start, end, group_by)
        return result

    async def summary(self, key: KeyRecord) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("summary", key)
        return result

    async def administer(self, actor: Actor, operation: str, arguments: dict[str, Any]) -> Any:
        return await self._call("administer", actor, operation, arguments)
