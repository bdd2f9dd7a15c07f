"""The billing actor: a single-replica Ray Serve deployment owning the ledger (Ray Serve restarts it on failure).

A thin shell over ``BillingService``: errors travel back as values (``AnkerError``), never as crashes, and a sweep
releases budget leases that no replica renews any more and, once a day, deletes rows past their retention. All state
that matters is in the database, but for the rate-limit buckets, which a restart refills.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from opentelemetry.trace import SpanKind
from ray import serve

from config.naming import BILLING_DEPLOYMENT
from deployments.billing.governance import Actor
from deployments.billing.service import BillingService, BillingSpec
from deployments.contracts import KeyCheck, LeaseAsk, LeaseGrant, LeaseUpkeep, Principal, UpkeepResult, UsageReport
from deployments.errors import AnkerError
from deployments.keys import KeyRecord
from observability import tracing

logger = logging.getLogger("ray.serve")

SWEEP_PERIOD_S = 5.0  # a lapsed lease's amount is back in its budgets within this of its expiry
PURGE_PERIOD_S = 24 * 3600.0


@serve.deployment(name=BILLING_DEPLOYMENT, num_replicas=1, max_ongoing_requests=1024, health_check_period_s=10)
class Billing:
    def __init__(self, spec: BillingSpec) -> None:
        tracing.configure("anker-billing")
        self._service = BillingService(spec)
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        """Lapsed budget leases every few seconds; rows past their retention once a day."""
        purged_at = -PURGE_PERIOD_S
        while True:
            await asyncio.sleep(SWEEP_PERIOD_S)
            with contextlib.suppress(Exception):
                released = await self._service.release_expired()
                if released:
                    logger.warning("billing: released %d budget leases their replicas stopped renewing", released)
            if time.monotonic() - purged_at >= PURGE_PERIOD_S:
                try:
                    deleted = await self._service.purge_expired()
                    purged_at = time.monotonic()
                except Exception as exc:  # tried again at the next sweep
                    logger.error("billing: retention purge failed with %s", type(exc).__name__)
                else:
                    if any(deleted.values()):
                        logger.info("billing: retention purge deleted %s", deleted)

    async def authenticate(self, key: str) -> Principal | None:
        return await self._service.authenticate(key)

    async def key_check(self) -> KeyCheck:
        return await self._service.key_check()

    async def is_admin_token(self, token: str) -> bool:
        return self._service.is_admin_token(token)

    async def rate_limit_headers(self, key: KeyRecord) -> dict[str, str]:
        return self._service.rate_limit_headers(key)

    async def lease(self, key: KeyRecord, ask: LeaseAsk) -> LeaseGrant | AnkerError:
        attrs = {"anker.tenant": key.tenant, "anker.key_id": key.key_id}
        with tracing.span("billing.lease", ask.trace, SpanKind.SERVER, attrs) as current:
            try:
                grant = await self._service.lease(key, ask)
            except AnkerError as error:
                tracing.failed(current, error)
                return error
            if isinstance(grant.refusal, AnkerError):
                tracing.failed(current, grant.refusal)
            return grant

    async def upkeep(self, upkeep: LeaseUpkeep) -> UpkeepResult:
        return await self._service.upkeep(upkeep)

    async def record(self, reports: Sequence[UsageReport]) -> list[str]:
        return await self._service.record(reports)

    async def usage(
        self, key: KeyRecord, start: datetime, end: datetime, group_by: str | None
    ) -> dict[str, Any] | AnkerError:
        try:
            return await self._service.usage(key, start, end, group_by)
        except AnkerError as error:
            return error

    async def summary(self, key: KeyRecord) -> dict[str, Any]:
        return await self._service.summary(key)

    async def administer(self, actor: Actor, operation: str, arguments: dict[str, Any]) -> Any:
        try:
            return await self._service.administer(actor, operation, arguments)
        except AnkerError as error:
            return error

    async def check_health(self) -> None:
        if self._sweeper.done():
            raise RuntimeError("billing sweeper stopped")
