"""The billing service: one object owning the ledger, keys, governance, budgets and rate limits, behind the billing
actor. Blocking database work runs in threads here, never on the actor's event loop.

It answers key look-ups and admission, and records usage reports idempotently (at-least-once delivery from the
ingress + an insert that ignores replays = each request billed exactly once). It sees counts, never content.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deployments import database
from deployments.billing import budgets, retention
from deployments.billing.governance import Actor, Governance, key_json, plan_json
from deployments.billing.ledger import Ledger, UsageBucket, UsageEvent, usage_total
from deployments.billing.pricing import TokenPrices, dkk_string
from deployments.billing.ratelimit import RateLimiter
from deployments.billing.tables import TENANTS
from deployments.contracts import Admission, AdmissionRequest
from deployments.errors import InvalidValue
from deployments.keys import KeyRecord, KeyStore, load_or_create_secret, secret_path
from observability import metrics

if TYPE_CHECKING:
    from config.schema import AnkerConfig, ModelConfig

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class BillingSpec:
    data_dir: Path
    database_url: str | None
    prices: dict[str, TokenPrices]  # per served model, from the config
    default_rpm: int
    default_tpm: int
    reservation_ttl_s: float = 900.0
    retention_months: int = 60


def model_prices(model: ModelConfig) -> TokenPrices:
    p = model.prices
    return TokenPrices.from_dkk_per_million(
        p.input_uncached_dkk_per_mtok, p.input_cached_dkk_per_mtok, p.output_dkk_per_mtok
    )


def billing_spec(config: AnkerConfig) -> BillingSpec:
    return BillingSpec(
        data_dir=config.data_dir.resolve(),
        database_url=config.database_url,
        prices={m.name: model_prices(m) for m in config.models},
        default_rpm=config.billing.default_rpm,
        default_tpm=config.billing.default_tpm,
        reservation_ttl_s=config.billing.reservation_ttl_s,
        retention_months=config.billing.retention_months,
    )


@dataclass(frozen=True)
class UsageReport:
    """Ingress -> billing after a request ends (completed, failed or cut off): the event plus tokens to refund."""

    event: UsageEvent
    reserved_tokens: int


@dataclass(frozen=True)
class Principal:
    """A verified key as the ingress caches it: the key's settings and whether any budget applies to it."""

    key: KeyRecord
    has_budget: bool


def admin_token_path(data_dir: Path) -> Path:
    return data_dir / "secrets" / "admin.token"


def load_or_create_admin_token(data_dir: Path) -> str:
    """The operator's admin token for ``/admin``: random, in a 0600 file, created on first use."""
    raw = load_or_create_secret(admin_token_path(data_dir))
    return "ank_admin_" + raw.hex()


class BillingService:
    def __init__(self, spec: BillingSpec) -> None:
        self._spec = spec
        url = database.database_url(spec.data_dir, spec.database_url)
        self.ledger = Ledger(url)
        self.ledger.migrate()
        self.keys = KeyStore(self.ledger.engine, load_or_create_secret(secret_path(spec.data_dir)))
        self.governance = Governance(self.keys)
        self.limiter = RateLimiter()
        self._admin_digest = hashlib.sha256(load_or_create_admin_token(spec.data_dir).encode()).digest()
        now = datetime.now(UTC)
        for model, prices in spec.prices.items():
            if self.ledger.ensure_price(model, prices, now):
                logger.info("billing: price of %s set from %s", model, now.isoformat())

    # -- keys ---------------------------------------------------------------------------------------------------

    async def authenticate(self, key: str) -> Principal | None:
        return await asyncio.to_thread(self._authenticate, key)

    def _authenticate(self, key: str) -> Principal | None:
        record = self.keys.verify(key)
        if record is None:
            return None
        with self.ledger.engine.connect() as db:
            has_budget = bool(budgets.budgets_for(db, record.tenant, record.key_id))
        return Principal(record, has_budget)

    def is_admin_token(self, token: str) -> bool:
        return hmac.compare_digest(hashlib.sha256(token.encode()).digest(), self._admin_digest)

    def _limits(self, key: KeyRecord) -> tuple[int, int]:
        return key.rpm or self._spec.default_rpm, key.tpm or self._spec.default_tpm

    # -- admission and usage ------------------------------------------------------------------------------------

    def rate_limit_headers(self, key: KeyRecord) -> dict[str, str]:
        return self.limiter.peek(key.key_id, *self._limits(key)).headers()

    async def admit(self, key: KeyRecord, request: AdmissionRequest) -> Admission:
        """Rate limits, then the budget reservation of the request's maximum cost; raises an ``AnkerError``."""
        tokens = request.prompt_tokens + request.max_output_tokens
        state = self.limiter.admit(key.key_id, *self._limits(key), tokens)
        try:
            reserved = await asyncio.to_thread(self._reserve, request)
        except BaseException:
            self.limiter.refund(key.key_id, tokens, request=True)  # a refused request uses no limit
            raise
        return Admission(state.headers(), tokens, reserved)

    def _reserve(self, request: AdmissionRequest) -> bool:
        now = datetime.now(UTC)
        prices = self.ledger.price_at(request.model, now)
        if prices is None:
            raise InvalidValue(f"The model `{request.model}` has no price; it cannot be billed.", "model")
        worst_case = (
            request.prompt_tokens * prices.input_uncached_nano_dkk + request.max_output_tokens * prices.output_nano_dkk
        )
        with self.ledger.engine.begin() as db:
            return budgets.reserve(db, request.tenant, request.key_id, request.billing_id, worst_case, now)

    async def record(self, reports: Sequence[UsageReport]) -> list[str]:
        """Stores the reports' events (replays change nothing); returns the billing ids now safe in the ledger."""
        new = await asyncio.to_thread(self.ledger.record_new, [r.event for r in reports])
        for report in reports:
            event = report.event
            cost_nano = new.pop(event.request_id, None)
            if cost_nano is None:
                continue  # a replay, or a repeat within the batch: counted once
            used = event.prompt_tokens + event.completion_tokens
            self.limiter.refund(event.key_id, report.reserved_tokens - used)
            if cost_nano or event.status == "ok":  # what was billed (a request that produced nothing was not)
                metrics.tokens(
                    event.model, event.prompt_tokens - event.cached_tokens, event.cached_tokens, event.completion_tokens
                )
                metrics.billed(event.model, cost_nano)
        return [r.event.request_id for r in reports]

    async def release_expired(self) -> int:
        cutoff = datetime.now(UTC) - timedelta(seconds=self._spec.reservation_ttl_s)

        def run() -> int:
            with self.ledger.engine.begin() as db:
                return budgets.release_expired(db, cutoff)

        return await asyncio.to_thread(run)

    async def purge_expired(self, now: datetime | None = None) -> dict[str, int]:
        """Deletes rows past ``retention_months`` (deployments/billing/retention.py); rows deleted per table."""
        cutoff = retention.retention_cutoff(now or datetime.now(UTC), self._spec.retention_months)

        def run() -> dict[str, int]:
            with self.ledger.engine.begin() as db:
                return retention.purge(db, cutoff)

        return await asyncio.to_thread(run)

    # -- what customers see -------------------------------------------------------------------------------------

    async def usage(self, key: KeyRecord, start: datetime, end: datetime, group_by: str | None) -> dict[str, Any]:
        """A tenant's usage for its owners, admins and viewers; a member sees their own key's."""
        own_key = key.key_id if key.role == "member" else None
        buckets, totals = await asyncio.to_thread(self._usage, key.tenant, start, end, group_by, own_key)
        return {
            "object": "list",
            "tenant": key.tenant,
            "scope": "key" if own_key else "organization",
            "group_by": group_by,
            "start": _iso(start),
            "end": _iso(end),
            "currency": "DKK",
            "data": [bucket_json(b) for b in buckets],
            "totals": bucket_json(totals, with_range=False),
        }

    def _usage(
        self, tenant: str, start: datetime, end: datetime, group_by: str | None, key_id: str | None
    ) -> tuple[list[UsageBucket], UsageBucket]:
        buckets = self.ledger.usage(tenant, start, end, group_by, key_id)
        return buckets, usage_total(buckets, start, end)

    async def summary(self, key: KeyRecord) -> dict[str, Any]:
        now = datetime.now(UTC)
        period = budgets.month_period(now)
        start, end = budgets.month_bounds(period)
        usage = await self.usage(key, start, end, None)
        budget, plan = await asyncio.to_thread(self._budget_and_plan, key, now)
        return {
            "object": "usage.summary",
            "tenant": key.tenant,
            "key_id": key.key_id,
            "role": key.role,
            "month": period,
            "month_start": _iso(start),
            "month_end": _iso(end),
            "plan": plan,
            "budget": budget,
            "totals": usage["totals"],
        }

    def _budget_and_plan(self, key: KeyRecord, now: datetime) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        with self.ledger.engine.begin() as db:
            states = budgets.budget_summary(db, key.tenant, key.key_id, now)
            tenant = db.execute(TENANTS.select().where(TENANTS.c.tenant == key.tenant)).first()
        plan = plan_json(tenant)
        if not states:
            return None, plan
        tightest = min(states, key=lambda s: s.left_nano_dkk)
        return {
            "scope": tightest.budget.scope,
            "kind": tightest.budget.kind,
            "period": tightest.period,
            "limit_dkk": dkk_string(tightest.budget.limit_nano_dkk),
            "spent_dkk": dkk_string(tightest.spent_nano_dkk),
            "reserved_dkk": dkk_string(tightest.reserved_nano_dkk),
            "left_dkk": dkk_string(max(0, tightest.left_nano_dkk)),
        }, plan

    # -- administration -----------------------------------------------------------------------------------------

    async def administer(self, actor: Actor, operation: str, arguments: dict[str, Any]) -> Any:
        """Runs a governance operation (``create_key``, ``update_tenant``, ...) for ``actor``, off the loop."""
        method = getattr(self.governance, operation, None)
        if operation.startswith("_") or method is None:
            raise InvalidValue(f"Unknown operation {operation}.")
        result = await asyncio.to_thread(method, actor, **arguments)
        return _jsonable(result)


def _jsonable(result: Any) -> Any:
    if isinstance(result, KeyRecord):
        return key_json(result)
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], KeyRecord):
        return {**key_json(result[0]), "key": result[1]}  # the one time a key leaves the service
    if isinstance(result, list):
        return [_jsonable(r) for r in result]
    return result


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def bucket_json(bucket: UsageBucket, with_range: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if with_range:
        body.update({"start": _iso(bucket.start), "end": _iso(bucket.end), "model": bucket.model})
    body.update(
        {
            "requests": bucket.requests,
            "input_uncached_tokens": bucket.prompt_tokens - bucket.cached_tokens,
            "input_cached_tokens": bucket.cached_tokens,
            "output_tokens": bucket.completion_tokens,
            "cost_dkk": dkk_string(bucket.cost_nano_dkk),
            "cost_input_uncached_dkk": dkk_string(bucket.cost_input_uncached_nano_dkk),
            "cost_input_cached_dkk": dkk_string(bucket.cost_input_cached_nano_dkk),
            "cost_output_dkk": dkk_string(bucket.cost_output_nano_dkk),
            "cost_nano_dkk": bucket.cost_nano_dkk,
        }
    )
    return body
