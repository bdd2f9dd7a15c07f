"""The engine replica that serves HTTP itself: a Serve ingress deployment whose ASGI app (``app.py``) runs in the
replica's own process beside its ``AsyncLLM``, so with Serve's direct ingress no token crosses another process.

Its door (``gate.py``) checks keys through the billing actor's cache, admits from the leases the actor grants
(``deployments/billing/admission.py``) and bills through its usage outbox, which hands each report over until the
ledger has it. ``build_apps`` makes one application of it per model.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve

from autoscaling.queue_policy import KV_CACHE_METRIC, QUEUE_METRIC
from config.naming import APP_NAME, BILLING_DEPLOYMENT
from deployments.billing.client import ServeBillingClient
from deployments.drain import DrainGate, watch_drain
from deployments.server.app import create_server_app
from deployments.server.gate import Call, KeyGate
from deployments.server.metering import Deadlines, Metered
from deployments.server.observed import Capacity, RequestMetrics
from deployments.server.vllm_layer import ServingSpec, VllmLayer
from deployments.server.vllm_start import SchedulerGauge, gauge_stat_logger
from observability import metrics, tracing
from observability.tracing import TracingMiddleware

METRICS_PERIOD_S = 2.0

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class ReplicaSpec:
    """What one model's serving replica needs besides its engine: its door's settings (from the config)."""

    serving: ServingSpec
    model_cards: tuple[dict[str, Any], ...]
    region: str
    max_body_bytes: int
    deadlines: Deadlines  # the engine's, for its next output (server.request_timeout_s, stream_idle_timeout_s)
    key_cache_ttl_s: float = 10.0
    usage_flush_interval_s: float = 0.2
    usage_spool_dir: Path | None = None  # this node's folder of usage spool files (usage_outbox.Spool)
    billing_app: str = APP_NAME  # the application whose billing actor (BILLING_DEPLOYMENT) keeps the ledger
    max_calls: int = 320  # calls at once (vLLM's batch and its queue); beyond, 503 engine_overloaded
    overload_retry_after_s: int = 2
    log_requests: bool = False  # a usage line per call (server.log_requests)


def serving_app(
    vllm_state: Any,
    model: str,
    model_cards: list[dict[str, Any]],
    max_body_bytes: int,
    billing: ServeBillingClient,
    region: str,
    max_calls: int,
    overload_retry_after_s: int,
    replica_id: str,
    deadlines: Deadlines,
    metered: Callable[[Call, Metered], None] = lambda call, metered: None,
    log_requests: bool = False,
) -> DrainGate:
    """What an engine replica serves: the HTTP app over vLLM's serving objects behind its door, outermost first the
    drain (while `anker down` or a pod's stop drains, new requests get 503 at once and the running ones finish; the
    drain waits for the usage outbox too), tracing, metrics, back-pressure, then the door, which holds the engine
    to ``deadlines``."""
    app = create_server_app(vllm_state, model, model_cards, max_body_bytes)
    door = KeyGate(app, billing, model, region, metered, deadlines=deadlines, log_requests=log_requests)
    capacity = Capacity(door, max_calls, overload_retry_after_s)
    served_by = {"anker.model": model, "anker.engine_replica": replica_id}
    return DrainGate(TracingMiddleware(RequestMetrics(capacity, model), served_by))


@serve.deployment(name="EngineServer", health_check_period_s=5, health_check_timeout_s=30)
@serve.ingress()
class EngineServer:
    """One model's engine replica, serving the OpenAI API. Options (name, resources, placement) come from the
    builder."""

    def __init__(self, spec: ReplicaSpec) -> None:
        self._spec = spec.serving
        self._replica_spec = spec
        tracing.configure(f"anker-engine-{self._spec.engine.model}")
        self._gauge = SchedulerGauge()
        self._layer = VllmLayer(self._spec, stat_loggers=[gauge_stat_logger(self._gauge)])
        # The billing actor is another application's (the control application's): reached by its name.
        billing = serve.get_deployment_handle(BILLING_DEPLOYMENT, spec.billing_app)
        self._billing = ServeBillingClient(
            billing, spec.key_cache_ttl_s, spec.usage_flush_interval_s, spec.usage_spool_dir
        )
        self._replica = serve.get_replica_context().replica_id.unique_id
        self._tasks: list[asyncio.Task[None]] = []
        self._totals = dict.fromkeys(("requests", "prompt_tokens", "cached_tokens", "output_tokens"), 0)

    async def __serve_build_asgi_app__(self) -> Any:
        """Serve's late-bound ingress: the app exists once the engine does."""
        await self._layer.start()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._report_load()),
            loop.create_task(self._billing.outbox.run()),
            loop.create_task(self._billing.admission.run()),
            loop.create_task(self._report_pending()),
        ]
        spec, model = self._replica_spec, self._spec.engine.model
        gate = serving_app(
            self._layer.state,
            model,
            list(spec.model_cards),
            spec.max_body_bytes,
            self._billing,
            spec.region,
            spec.max_calls,
            spec.overload_retry_after_s,
            self._replica,
            spec.deadlines,
            self._metered,
            spec.log_requests,
        )
        context = serve.get_replica_context()
        outbox = self._billing.outbox
        watch = watch_drain(gate, context.app_name, context.replica_id.to_full_id_str(), lambda: outbox.pending)
        self._tasks.append(loop.create_task(watch))
        return gate

    def _metered(self, call: Call, metered: Metered) -> None:
        # Tokens billed are counted by the billing actor (``anker_tokens_total``), once a request's usage is in the
        # ledger; counted here too, the dashboards would show each token twice.
        if not metered.admitted:
            return
        self._totals["requests"] += 1
        self._totals["prompt_tokens"] += metered.prompt_tokens
        self._totals["cached_tokens"] += metered.cached_tokens
        self._totals["output_tokens"] += metered.output_tokens

    async def metered_totals(self) -> dict[str, int]:
        """What this replica has metered since it started: requests and tokens by kind. Counts only."""
        return dict(self._totals)

    def _queue(self) -> tuple[int, int, int]:
        in_flight = self._layer.llm.output_processor.get_num_unfinished_requests()
        # The scheduler reports only when the engine steps; once nothing is in flight its last figures are stale.
        running = min(self._gauge.running, in_flight)
        return running, min(self._gauge.waiting, in_flight - running), in_flight

    async def _report_pending(self) -> None:
        while True:
            metrics.usage_pending(self._replica, self._billing.outbox.pending)
            await asyncio.sleep(METRICS_PERIOD_S)

    async def _report_load(self) -> None:
        while True:
            running, waiting, in_flight = self._queue()
            usage = self._gauge.kv_cache_usage if in_flight else 0.0
            metrics.engine_load(self._spec.engine.model, self._replica, running + waiting, usage)
            await asyncio.sleep(METRICS_PERIOD_S)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's hook for custom autoscaling metrics: this replica's vLLM queue and KV-cache use."""
        running, waiting, in_flight = self._queue()
        return {
            QUEUE_METRIC: float(running + waiting),
            KV_CACHE_METRIC: self._gauge.kv_cache_usage if in_flight else 0.0,
        }

    async def record_routing_stats(self) -> dict[str, float]:
        """vLLM's own queue on this replica right now, for request routers, operators and tests. Counts only."""
        running, waiting, in_flight = self._queue()
        return {"running": float(running), "waiting": float(waiting), "in_flight": float(in_flight)}

    async def ready(self) -> bool:
        """Whether the engine serves (the control application's readiness watch asks)."""
        return not self._layer.dead

    async def check_health(self) -> None:
        # A dead engine core makes the replica unhealthy, so Ray Serve replaces it.
        if self._layer.dead:
            raise RuntimeError(f"vLLM engine for {self._spec.engine.model} is dead")

    async def __del__(self) -> None:
        # Ray Serve is stopping this replica: hand over the usage it still holds before it goes.
        billing = getattr(self, "_billing", None)
        if billing is not None:
            if not await billing.outbox.drain(timeout_s=10.0):
                logger.error(
                    "engine replica stopping with %d usage reports undelivered; they stay in its spool file",
                    billing.outbox.pending,
                )
            try:  # what the replica holds of keys' limits and budgets goes back now rather than when it lapses
                await asyncio.wait_for(billing.admission.give_back(), 5.0)
            except Exception as exc:
                logger.warning("engine replica stopping: leases left to lapse (%s)", type(exc).__name__)
            billing.outbox.close()
        layer = getattr(self, "_layer", None)
        if layer is not None:
            layer.shutdown()
