"""The HTTP paths in one process for fast tests: an engine replica's app and door over vLLM's serving layer on a
tiny model, and the control application, each with the billing deployment's real class on a real database.

Only transports are replaced: handles by ``InProcessHandleDouble``; where a test measures something other than
generation, the engine by a double around the real one (``ScriptedOutputEngineDouble``, and ``HangingEngineDouble``
while a test makes it hang).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from config.naming import model_route_prefix
from deployments.billing.actor import Billing
from deployments.billing.client import ServeBillingClient
from deployments.billing.governance import Actor
from deployments.billing.pricing import TokenPrices
from deployments.billing.service import BillingService, BillingSpec
from deployments.control import AppsCatalog, create_control_app
from deployments.openai.catalog import ServedModel
from deployments.server.app import create_server_app
from deployments.server.gate import Call, KeyGate
from deployments.server.metering import Deadlines, Metered
from deployments.server.vllm_layer import EngineClientDouble, ServingSpec, VllmLayer
from deployments.server.vllm_start import EngineSpec
from observability.tracing import TracingMiddleware
from testkit.doubles import HangingEngineDouble, InProcessHandleDouble, ScriptedOutputEngineDouble

CTX = 512
PRICES = TokenPrices.from_dkk_per_million(Decimal("6.00"), Decimal("3.00"), Decimal("45.00"))
REGIONS = {"qwen3-next-tiny": "dk", "qwen3-moe-tiny": "dk", "elsewhere-tiny": "us"}


@dataclass
class InProcessControl:
    client: httpx.AsyncClient
    service: BillingService
    ready: dict[str, bool]  # each model application's readiness, as the control application's watches see it
    app: FastAPI
    handle: InProcessHandleDouble  # the billing actor's, as the control application reaches it

    def key(self, tenant: str = "t", **settings: Any) -> str:
        _, key = self.service.governance.create_key(Actor.operator("test"), tenant, **settings)
        return key


@asynccontextmanager
async def inprocess_control(
    data_dir: Path, models: tuple[str, ...], billing: Any = None
) -> AsyncIterator[InProcessControl]:
    """The control application (deployments/control.py) over the real billing class and ledger
    (``billing``'s, if given: a replica's, say); its model applications are not there: whether each is up is
    ``ready``, which the test sets."""
    own = billing is None
    if own:
        spec = BillingSpec(data_dir, None, {name: PRICES for name in models}, default_rpm=600, default_tpm=2_000_000)
        billing = Billing.func_or_class(spec)
    handle = InProcessHandleDouble(billing)
    accounts = ServeBillingClient(handle, 0.0, 0.05)  # type: ignore[arg-type]
    ready = dict.fromkeys(models, False)
    catalog = AppsCatalog(tuple(ServedModel(m, CTX, "anker", 1, REGIONS.get(m, "dk")) for m in models), ready.copy)
    app = create_control_app(catalog, accounts, 64 * 1024, {m: model_route_prefix(m) for m in models})
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://anker") as client:
            yield InProcessControl(client, billing._service, ready, app, handle)
    finally:
        if own:
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


# -- an engine replica's door over a real vLLM -------------------------------------------------------------------

REPLICA_MODEL = "qwen3-moe-tiny"
REPLICA_BODY_LIMIT = 64 * 1024
REPLICA_ID = "inprocess-replica"
# The engine's deadlines of a replica whose test is not about them: far beyond what the tiny model takes.
DEADLINES = Deadlines(request_s=300.0, stream_idle_s=120.0)


@asynccontextmanager
async def serving_layer(
    path: Path, model: str = REPLICA_MODEL, engine_client_double: EngineClientDouble | None = None
) -> AsyncIterator[ServingLayer]:
    """vLLM's serving layer over a real ``AsyncLLM`` on a tiny model, with the profile's parsers, as an engine
    replica starts it (about 20 s); its engine client's engine is a ``ScriptedOutputEngineDouble`` around the real
    one (or around ``engine_client_double`` over it), behind the replica's meter. The caller sets vLLM's CPU
    environment (``VLLM_CPU_KVCACHE_SPACE``, …)."""
    spec = ServingSpec(
        EngineSpec(
            model=model,
            path=path,
            max_model_len=2048,
            tensor_parallel_size=1,
            pipeline_parallel_size=1,
            engine_args={"dtype": "bfloat16", "enforce_eager": True, "max_num_seqs": 8},
        ),
        reasoning_parser="qwen3",
        tool_call_parser="qwen3_coder",
        engine_client_double=engine_client_double,
    )
    layer = VllmLayer(spec)
    await layer.start()
    try:
        meter = layer.state.openai_serving_chat.engine_client  # every serving object reaches the engine through it
        tokenizer = layer.llm.get_tokenizer()
        scripted = ScriptedOutputEngineDouble(
            meter._engine, lambda text: tokenizer.encode(text, add_special_tokens=False)
        )
        meter._engine = scripted
        yield ServingLayer(layer, model, scripted)
    finally:
        layer.shutdown()


@dataclass
class ServingLayer:
    layer: VllmLayer
    model: str
    scripted: ScriptedOutputEngineDouble

    @contextmanager
    def hanging(self, outputs: int) -> Iterator[HangingEngineDouble]:
        """While inside, the engine hangs after ``outputs`` outputs of each request (testkit/doubles.py)."""
        meter = self.layer.state.openai_serving_chat.engine_client
        hanging = HangingEngineDouble(meter._engine, outputs)
        meter._engine = hanging
        try:
            yield hanging
        finally:
            meter._engine = hanging._engine

    @property
    def unfinished(self) -> int:
        """Requests the real engine is working on."""
        return int(self.layer.llm.output_processor.get_num_unfinished_requests())


@dataclass
class InProcessReplica:
    """An engine replica's HTTP app and door (``KeyGate``) over one ``ServingLayer``, inside the replica's server
    span (``TracingMiddleware``), its billing the deployment's own class on a real ledger, reached through a handle
    double as the replica reaches it."""

    client: httpx.AsyncClient
    service: BillingService
    accounts: ServeBillingClient
    reports: list[tuple[Call, Metered]]
    handle: InProcessHandleDouble  # the billing actor's: ``down`` makes it unreachable
    app: Any  # the ASGI app the client reaches: the traced door over the replica's HTTP app
    billing: Any  # the billing deployment's instance (``Billing``), for a control application beside it

    def key(self, tenant: str = "t", **settings: Any) -> str:
        """A new key made by the operator (``role``, ``allowed_models``, ``budget_dkk``, ``rpm``, ``tpm`` ...)."""
        _, key = self.service.governance.create_key(Actor.operator("test"), tenant, **settings)
        return key

    async def ledger(self, tenant: str = "t") -> list[dict[str, Any]]:
        """The tenant's ledger rows, once the replica's outbox has handed every usage report to billing."""
        assert await self.accounts.outbox.drain(timeout_s=10.0), "usage reports were not acknowledged"
        return list(self.service.ledger.events(tenant))

    async def budget(self, key: str) -> dict[str, Any]:
        """The key's budget as ``/v1/usage/summary`` shows it (the control application's route, not a replica's),
        once the replica has handed over every usage report and given back the leases no request uses."""
        assert await self.accounts.outbox.drain(timeout_s=10.0), "usage reports were not acknowledged"
        await self.accounts.admission.give_back()
        record = await self.accounts.verify(key)
        assert record is not None
        budget: dict[str, Any] = (await self.service.summary(record))["budget"]
        return budget


@asynccontextmanager
async def inprocess_replica(
    serving: ServingLayer,
    data_dir: Path,
    database_url: str | None = None,
    region: str = "dk",
    default_rpm: int = 600,
    default_tpm: int = 2_000_000,
    deadlines: Deadlines = DEADLINES,
) -> AsyncIterator[InProcessReplica]:
    spec = BillingSpec(data_dir, database_url, {serving.model: PRICES}, default_rpm, default_tpm)
    billing = Billing.func_or_class(spec)
    handle = InProcessHandleDouble(billing)
    accounts = ServeBillingClient(handle, key_cache_ttl_s=0.0, flush_interval_s=0.05)  # type: ignore[arg-type]
    outbox = asyncio.create_task(accounts.outbox.run())
    reports: list[tuple[Call, Metered]] = []
    cards = [{"id": serving.model, "object": "model", "created": 0, "owned_by": "anker"}]
    app = create_server_app(serving.layer.state, serving.model, cards, REPLICA_BODY_LIMIT)
    door = KeyGate(
        app,
        accounts,
        serving.model,
        region,
        lambda call, metered: reports.append((call, metered)),
        deadlines=deadlines,
        log_requests=True,  # its line is what some tests read (what a replica logs: ids and counts only)
    )
    traced = TracingMiddleware(door, {"anker.model": serving.model, "anker.engine_replica": REPLICA_ID})
    try:
        transport = httpx.ASGITransport(app=traced)
        async with httpx.AsyncClient(transport=transport, base_url="http://anker", timeout=120) as client:
            yield InProcessReplica(client, billing._service, accounts, reports, handle, traced, billing)
    finally:
        outbox.cancel()
        billing._sweeper.cancel()
        billing._service.ledger.dispose()
