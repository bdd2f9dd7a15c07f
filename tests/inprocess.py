"""The whole HTTP path in one process for fast tests: the real ASGI app, the real tokenizer logic, the real billing
deployment class on a real SQLite database, and engine doubles (generation is not what these tests measure).

Only transports are replaced: handles by ``InProcessHandleDouble``, engines by ``InstantEngineDouble``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

from config.naming import model_route_prefix
from deployments.billing.actor import Billing
from deployments.billing.client import ServeBillingClient
from deployments.billing.governance import Actor
from deployments.billing.pricing import TokenPrices
from deployments.billing.service import BillingService, BillingSpec
from deployments.control import AppsCatalog, create_control_app
from deployments.ingress import ServeTokenizerClient
from deployments.openai.app import create_app
from deployments.openai.catalog import ServedModel
from deployments.openai.serving import OpenAIService
from deployments.tokenizer import Tokenizer, TokenizerCore
from testkit.doubles import InProcessHandleDouble, InstantEngineDouble, LocalTokenizerClient

CTX = 512
PRICES = TokenPrices.from_dkk_per_million(Decimal("6.00"), Decimal("3.00"), Decimal("45.00"))
REGIONS = {"qwen3-next-tiny": "dk", "qwen3-moe-tiny": "dk", "elsewhere-tiny": "us"}


@dataclass
class InProcessStack:
    client: httpx.AsyncClient
    service: BillingService
    accounts: ServeBillingClient
    handle: InProcessHandleDouble
    engines: dict[str, InstantEngineDouble]
    openai: OpenAIService

    def key(self, tenant: str = "t", **settings: Any) -> str:
        """A new key made by the operator (``role``, ``allowed_models``, ``budget_dkk``, ``rpm``, ``tpm`` ...)."""
        _, key = self.service.governance.create_key(Actor.operator("test"), tenant, **settings)
        return key

    async def deliver_usage(self) -> None:
        """Waits until the ingress's outbox has handed every usage report to billing."""
        assert await self.accounts.outbox.drain(timeout_s=10.0), "usage reports were not acknowledged"


@asynccontextmanager
async def inprocess_stack(
    core: TokenizerCore,
    data_dir: Path,
    engines: dict[str, InstantEngineDouble] | None = None,
    default_rpm: int = 600,
    default_tpm: int = 2_000_000,
    database_url: str | None = None,
    tokenizer_deployment: bool = False,
) -> AsyncIterator[InProcessStack]:
    """``tokenizer_deployment`` runs the real Tokenizer deployment class behind a handle double (as the ingress
    reaches it in production) instead of calling the tokenizer logic directly."""
    engines = engines or {"qwen3-next-tiny": InstantEngineDouble(), "qwen3-moe-tiny": InstantEngineDouble()}
    spec = BillingSpec(
        data_dir=data_dir,
        database_url=database_url,
        prices={name: PRICES for name in engines},
        default_rpm=default_rpm,
        default_tpm=default_tpm,
    )
    billing = Billing.func_or_class(spec)  # the deployment's own class, outside Ray
    handle = InProcessHandleDouble(billing)
    accounts = ServeBillingClient(handle, key_cache_ttl_s=0.0, flush_interval_s=0.05)  # type: ignore[arg-type]
    models = [ServedModel(name, CTX, "anker", 1, REGIONS.get(name, "dk")) for name in engines]
    tokenizer: Any = LocalTokenizerClient(core)
    if tokenizer_deployment:
        instance = Tokenizer.func_or_class.__new__(Tokenizer.func_or_class)
        instance._core = core  # the deployment class around the already-loaded tokenizers
        tokenizer = ServeTokenizerClient(InProcessHandleDouble(instance))  # type: ignore[arg-type]
    service = OpenAIService(models, tokenizer, dict(engines), accounts)  # type: ignore[arg-type]
    app = create_app(service, accounts, max_body_bytes=64 * 1024)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://anker") as client:
            yield InProcessStack(client, billing._service, accounts, handle, engines, service)
    finally:
        billing._sweeper.cancel()
        billing._service.ledger.dispose()


@dataclass
class InProcessControl:
    client: httpx.AsyncClient
    service: BillingService
    ready: dict[str, bool]  # each model application's readiness, as the control application's watches see it

    def key(self, tenant: str = "t", **settings: Any) -> str:
        _, key = self.service.governance.create_key(Actor.operator("test"), tenant, **settings)
        return key


@asynccontextmanager
async def inprocess_control(data_dir: Path, models: tuple[str, ...]) -> AsyncIterator[InProcessControl]:
    """The second edition's control application (deployments/control.py) over the real billing class and ledger;
    its model applications are not there: whether each is up is ``ready``, which the test sets."""
    spec = BillingSpec(data_dir, None, {name: PRICES for name in models}, default_rpm=600, default_tpm=2_000_000)
    billing = Billing.func_or_class(spec)
    accounts = ServeBillingClient(InProcessHandleDouble(billing), 0.0, 0.05)  # type: ignore[arg-type]
    ready = dict.fromkeys(models, False)
    catalog = AppsCatalog(tuple(ServedModel(m, CTX, "anker", 1, REGIONS.get(m, "dk")) for m in models), ready.copy)
    app = create_control_app(catalog, accounts, 64 * 1024, {m: model_route_prefix(m) for m in models})
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://anker") as client:
            yield InProcessControl(client, billing._service, ready)
    finally:
        billing._sweeper.cancel()
        billing._service.ledger.dispose()


def clean_postgres(url: str) -> str:
    """Empties the throwaway server's database (a fresh schema for one test) and returns the URL."""
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    with engine.begin() as c:
        c.execute(sa.text("DROP SCHEMA public CASCADE"))
        c.execute(sa.text("CREATE SCHEMA public"))
    engine.dispose()
    return url
