"""The billing service: one object owning the ledger, keys, governance, budgets and rate limits, behind the billing
actor. Blocking database work runs in threads here, never on the actor's event loop.

It answers key look-ups, grants the leases that replicas admit requests from (slices of a key's rate limits and
budgets), and records usage reports idempotently (at-least-once delivery from the replicas + an insert that ignores
replays = each request billed exactly once). It sees counts, never content.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deployments import database
from deployments.billing import budgets, retention
from deployments.billing.governance import Actor, Governance, key_json, plan_json
from deployments.billing.ledger import Ledger, UsageBucket, usage_total
from deployments.billing.pricing import LEASE_REQUESTS, TokenPrices, dkk_string, worst_case_nano_dkk
from deployments.billing.ratelimit import RateLimiter
from deployments.billing.tables import TENANTS
from deployments.contracts import (
    KeyCheck,
    LeaseAsk,
    LeaseGrant,
    LeaseUpkeep,
    LimitSnapshot,
    Principal,
    UpkeepResult,
    UsageReport,
)
from deployments.errors import AnkerError, BillingUnavailable, InvalidValue
from deployments.keys import KeyRecord, KeyStore, load_or_create_secret, secret_path
from observability import metrics

if TYPE_CHECKING:
    from config.schema import AnkerConfig, ModelConfig

logger = logging.getLogger("ray.serve")

# The most usage events one ledger transaction takes from batches that waited together (``record``): eight of an
# outbox's full batches (deployments/usage_outbox.py), so that a transaction stays short.
GROUP_COMMIT_EVENTS = 2048


def _answer(future: asyncio.Future[None], error: BaseException | None) -> None:
    """Ends a waiting ``record`` call (unless its caller has gone): its batch is written, or ``error``."""
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


@dataclass(frozen=True)
class BillingSpec:
    data_dir: Path
    database_url: str | None
    prices: dict[str, TokenPrices]  # per served model, from the config
    default_rpm: int
    default_tpm: int
    lease_ttl_s: float = 30.0
    retention_months: int = 60
    # The key secret and the admin token: an operator-provided folder (a mounted Kubernetes Secret, read only), or
    # None for the data folder's ``secrets/``, made on first use.
    secrets_dir: Path | None = None

    @property
    def secrets_path(self) -> Path:
        return self.secrets_dir if self.secrets_dir is not None else self.data_dir / "secrets"


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
        lease_ttl_s=config.billing.lease_ttl_s,
        retention_months=config.billing.retention_months,
        secrets_dir=config.secrets_dir.resolve() if config.secrets_dir is not None else None,
    )


def admin_token_path(secrets_dir: Path) -> Path:
    return secrets_dir / "admin.token"


def load_or_create_admin_token(secrets_dir: Path, create: bool = True) -> str:
    """The operator's admin token for ``/admin``: random, in a 0600 file of the secrets folder, made on first use
    unless the folder is the operator's own (``create`` False)."""
    raw = load_or_create_secret(admin_token_path(secrets_dir), create)
    return "ank_admin_" + raw.hex()


class BillingService:
    def __init__(self, spec: BillingSpec) -> None:
        self._spec = spec
        url = database.database_url(spec.data_dir, spec.database_url)
        self.ledger = Ledger(url)
        self.ledger.migrate()
        provided = spec.secrets_dir is not None  # an operator's folder: read, never written
        self.keys = KeyStore(self.ledger.engine, load_or_create_secret(secret_path(spec.secrets_path), not provided))
        self.governance = Governance(self.keys)
        self.limiter = RateLimiter()
        self._to_write: deque[tuple[Sequence[UsageReport], asyncio.Future[None]]] = deque()  # batches ``record`` holds
        self._writer: asyncio.Task[None] | None = None
        admin_token = load_or_create_admin_token(spec.secrets_path, not provided)
        self._admin_digest = hashlib.sha256(admin_token.encode()).digest()
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
        return Principal(record, has_budget, *self._limits(record))

    async def key_check(self) -> KeyCheck:
        return KeyCheck(self.keys.tag_key, await asyncio.to_thread(self.keys.untagged_key_ids), self._admin_digest)

    def is_admin_token(self, token: str) -> bool:
        return hmac.compare_digest(hashlib.sha256(token.encode()).digest(), self._admin_digest)

    def _limits(self, key: KeyRecord) -> tuple[int, int]:
        return key.limits(self._spec.default_rpm, self._spec.default_tpm)

    # -- leases and usage ---------------------------------------------------------------------------------------

    def rate_limit_headers(self, key: KeyRecord) -> dict[str, str]:
        return self.limiter.peek(key.key_id, *self._limits(key)).headers()

    def _prices(self, model: str) -> TokenPrices:
        prices = self._spec.prices.get(model)  # the config's, which the ledger holds from this actor's start on
        if prices is None:
            raise InvalidValue(f"The model `{model}` has no price; it cannot be billed.", "model")
        return prices

    async def lease(self, key: KeyRecord, ask: LeaseAsk) -> LeaseGrant:
        """More of a key's rate limits and budgets for a replica (``LeaseAsk``). The budget first: a request it
        refuses takes no rate-limit permit. A refused part comes back as ``refusal``, with what was granted."""
        rpm, tpm = self._limits(key)
        prices = self._prices(ask.model)
        lease_id, lease_nano = None, 0
        if ask.budget is not None:
            budget = ask.budget
            if budget.need_nano_dkk:
                need, want = budget.need_nano_dkk, max(budget.want_nano_dkk, budget.need_nano_dkk)
            else:  # a replica that knows no price yet: the waiting request's maximum cost, at the prices now
                need = worst_case_nano_dkk(prices, budget.prompt_tokens, budget.max_output_tokens)
                want = need * LEASE_REQUESTS
            try:
                granted = await asyncio.to_thread(self._grant_lease, key, budget.lease_id, need, want)
            except AnkerError as error:
                return LeaseGrant(0, 0, self._snapshot(key, rpm, tpm), refusal=error, prices=prices)
            if granted is not None:
                lease_id, lease_nano = granted.lease_id, granted.amount_nano_dkk
        need_requests, need_tokens = ask.need_requests, ask.need_tokens
        refusal: AnkerError | None = None
        requests = tokens = 0
        if need_requests or need_tokens or ask.want_requests or ask.want_tokens:
            try:
                requests, tokens, _ = self.limiter.grant(
                    key.key_id, rpm, tpm, (need_requests, need_tokens), (ask.want_requests, ask.want_tokens)
                )
            except AnkerError as error:
                refusal = error
        return LeaseGrant(
            requests,
            tokens,
            self._snapshot(key, rpm, tpm),
            lease_id,
            lease_nano,
            self._spec.lease_ttl_s,
            prices,
            refusal,
        )

    def _snapshot(self, key: KeyRecord, rpm: int, tpm: int) -> LimitSnapshot:
        requests_left, tokens_left = self.limiter.levels(key.key_id, rpm, tpm)
        return LimitSnapshot(rpm, tpm, requests_left, tokens_left)

    def _grant_lease(self, key: KeyRecord, lease_id: str | None, need: int, want: int) -> budgets.LeaseGrant | None:
        with self.ledger.engine.begin() as db:
            return budgets.grant_lease(
                db, key.tenant, key.key_id, lease_id, need, want, datetime.now(UTC), self._spec.lease_ttl_s
            )

    async def upkeep(self, upkeep: LeaseUpkeep) -> UpkeepResult:
        """Leases kept alive, idle ones and idle rate-limit permits given back (``LeaseUpkeep``)."""
        for returned in upkeep.slices:
            self.limiter.give_back(returned.key_id, returned.requests, returned.tokens)
        renewed: list[str] = []
        if upkeep.renew or upkeep.release:
            renewed = await asyncio.to_thread(self._upkeep_leases, upkeep.renew, upkeep.release)
        return UpkeepResult(tuple(renewed), self._spec.lease_ttl_s)

    def _upkeep_leases(self, renew: Sequence[str], release: Sequence[str]) -> list[str]:
        expires_at = datetime.now(UTC) + timedelta(seconds=self._spec.lease_ttl_s)
        with self.ledger.engine.begin() as db:
            budgets.release_leases(db, release)
            return budgets.renew_leases(db, renew, expires_at)

    async def record(self, reports: Sequence[UsageReport]) -> list[str]:
        """Stores the reports' events (replays change nothing) and settles them against their leases; returns the
        billing ids now safe in the ledger, or set aside there (``Ledger.record_new``): either way, never sent
        again.

        Batches that arrive while one is being written wait and are written together, in one transaction (a group
        commit): one commit, one price look-up and one settlement per budget for all of them, which is most of a
        batch's fixed cost. A transaction that fails writes its batches again one at a time, so that a batch the
        ledger cannot take fails only its own sender."""
        written = asyncio.get_running_loop().create_future()
        self._to_write.append((reports, written))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_waiting())
        await written
        return [r.event.request_id for r in reports]

    async def _write_waiting(self) -> None:
        """Writes the waiting batches, as many together as ``GROUP_COMMIT_EVENTS`` allows, until none waits."""
        group: list[tuple[Sequence[UsageReport], asyncio.Future[None]]] = []
        try:
            while self._to_write:
                group, events = [], 0
                while self._to_write and (not group or events + len(self._to_write[0][0]) <= GROUP_COMMIT_EVENTS):
                    group.append(self._to_write.popleft())
                    events += len(group[-1][0])
                await self._write_group(group)
        finally:  # cancelled (the actor stops): no caller waits forever; their senders send again
            stopped = BillingUnavailable("Billing stopped before recording this batch.")
            for _, written in [*group, *self._to_write]:
                _answer(written, stopped)
            self._to_write.clear()

    async def _write_group(self, group: list[tuple[Sequence[UsageReport], asyncio.Future[None]]]) -> None:
        try:
            await self._write([report for reports, _ in group for report in reports])
        except Exception as error:
            if len(group) == 1:
                _answer(group[0][1], error)
                return
            for reports, written in group:  # one at a time: only a batch the ledger cannot take fails
                try:
                    await self._write(reports)
                except Exception as alone:
                    _answer(written, alone)
                else:
                    _answer(written, None)
        else:
            for _, written in group:
                _answer(written, None)

    async def _write(self, reports: Sequence[UsageReport]) -> None:
        leases = {r.event.request_id: r.lease_id for r in reports if r.lease_id is not None}
        recorded = await asyncio.to_thread(self.ledger.record_new, [r.event for r in reports], leases)
        new = recorded.new
        if recorded.set_aside:
            reasons = Counter(recorded.set_aside.values())
            for reason, count in reasons.items():
                metrics.set_aside(reason, count)
            logger.error("billing: %d usage reports set aside, unbilled (%s)", len(recorded.set_aside), dict(reasons))
        # Once per batch and model, not per event: a metric record costs more than the event's share of the insert.
        billed: dict[str, list[int]] = {}
        for report in reports:
            event = report.event
            cost_nano = new.pop(event.request_id, None)
            if cost_nano is None:
                continue  # a replay, or a repeat within the batch: counted once
            if cost_nano or event.status == "ok":  # what was billed (a request that produced nothing was not)
                sums = billed.setdefault(event.model, [0, 0, 0, 0])
                sums[0] += event.prompt_tokens - event.cached_tokens
                sums[1] += event.cached_tokens
                sums[2] += event.completion_tokens
                sums[3] += cost_nano
        for model, (uncached, cached, output, cost_nano) in billed.items():
            metrics.tokens(model, uncached, cached, output)
            metrics.billed(model, cost_nano)

    async def release_expired(self, now: datetime | None = None) -> int:
        """Releases the leases whose replicas stopped renewing them (``now``: a test's clock)."""

        def run() -> int:
            with self.ledger.engine.begin() as db:
                return budgets.release_expired(db, now or datetime.now(UTC))

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
