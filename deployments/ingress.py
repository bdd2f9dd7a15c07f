"""The ingress deployment: serves the OpenAI app and reaches the tokenizer, engines and billing actor through
deployment handles.

It owns the handle adapters (Ray errors become ``EngineUnavailable``/``EngineFailure``/``BillingUnavailable``
values), engine readiness, the cached key look-ups and the usage outbox. It never tokenizes, never generates, never
writes the database itself, and never logs request content.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import ray.serve.context
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from deployments.billing.governance import Actor
from deployments.billing.service import Principal, UsageReport
from deployments.contracts import Admission, AdmissionRequest, ChatTurn, EngineFailure, Prepared, Sampling
from deployments.drain import DrainGate, watch_drain
from deployments.errors import AnkerError, BillingUnavailable, EngineUnavailable
from deployments.keys import KeyRecord
from deployments.openai.app import create_app
from deployments.openai.serving import EngineItem, OpenAIService, ServedModel
from deployments.usage_outbox import UsageOutbox
from observability import metrics, tracing

logger = logging.getLogger("ray.serve")

READY_PROBE_TIMEOUT_S = 10.0
READY_PROBE_PERIOD_S = 5.0
NOT_READY_PROBE_PERIOD_S = 1.0


@dataclass(frozen=True)
class IngressSpec:
    models: tuple[ServedModel, ...]
    max_body_bytes: int
    key_cache_ttl_s: float = 10.0
    usage_flush_interval_s: float = 0.2
    usage_spool_dir: Path | None = None  # this node's folder of usage spool files (see usage_outbox.Spool)
    overload_retry_after_s: int = 2


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


@contextlib.contextmanager
def own_serve_request() -> Iterator[None]:
    """Handle calls made inside get a Serve request id of their own, instead of the HTTP request's.

    Ray Serve (2.60) tracks a call waiting for a replica by the internal id of the request that made it; two calls
    routed at once from one request (a completion with several prompts) share it, and the second is never matched
    to a replica: it waits forever. Our own code cancels the engine call when its caller goes away, so nothing
    relies on Serve's cancel-with-the-parent tracking, which also goes by that id.
    """
    current = ray.serve.context._get_serve_request_context()
    own = dataclasses.replace(current, _internal_request_id=uuid.uuid4().hex)
    token = ray.serve.context._serve_request_context.set(own)  # type: ignore[arg-type]  # Ray types it as None
    try:
        yield
    finally:
        ray.serve.context._serve_request_context.reset(token)


class ServeTokenizerClient:
    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle

    async def _call(self, method: str, *args: Any) -> Any:
        unavailable = EngineUnavailable("The tokenizer stage is unavailable. Please retry shortly.")
        return await call_deployment(self._handle, method, (*args, tracing.inject()), unavailable)

    async def prepare_chat(self, model: str, turns: list[ChatTurn], max_tokens: int | None) -> Prepared:
        prepared: Prepared = await self._call("prepare_chat", model, turns, max_tokens)
        return prepared

    async def prepare_completion(
        self, model: str, prompts: list[str | list[int]], max_tokens: int | None
    ) -> list[Prepared]:
        prepared: list[Prepared] = await self._call("prepare_completion", model, prompts, max_tokens)
        return prepared


class ServeEngineClient:
    """One model's engine deployment as seen by the ingress: streaming calls plus a readiness watch."""

    def __init__(self, model: str, handle: DeploymentHandle, overload_retry_after_s: int = 2) -> None:
        self._model = model
        self._handle = handle
        self._overload_retry_after_s = overload_retry_after_s
        self._stream = handle.options(stream=True)
        self._ready = False
        self._wake = asyncio.Event()

    @property
    def ready(self) -> bool:
        return self._ready

    async def generate(
        self, request_id: str, prepared: Prepared, sampling: Sampling, trace: tracing.Carrier | None = None
    ) -> AsyncGenerator[EngineItem, None]:
        responses: DeploymentResponseGenerator | None = None
        complete = False
        try:
            # Serve may refuse at once (back-pressure), before the first item.
            with own_serve_request():
                call = self._stream.generate.remote(
                    request_id,
                    prepared.token_ids,
                    sampling,
                    prepared.max_tokens,
                    trace or {},
                    block_hashes=prepared.block_hashes,
                    cache_salt=prepared.cache_salt,
                )
            assert isinstance(call, DeploymentResponseGenerator)
            responses = call
            finished: set[int] = set()
            failed = False
            async for item in responses:
                if isinstance(item, EngineFailure):
                    failed = True
                else:
                    finished.update(delta.index for delta in item if delta.finish_reason)
                yield item
            complete = True
            if not failed and len(finished) < sampling.n:
                # Every choice ends with a finish reason; a stream that stops before is one whose replica went away
                # (Serve can end a killed replica's stream instead of raising): a failure, not a short answer.
                logger.error("engine %s ended request %s before it finished", self._model, request_id)
                yield self._lost()
        except (asyncio.CancelledError, GeneratorExit):
            raise
        # The Serve call is over in both cases below (nothing to cancel: cancelling a refused call raises its error
        # again), whether or not the caller reads the failure.
        except BackPressureError:  # Serve's queue for this model is full: back-pressure, the engine is fine
            complete = True
            yield EngineFailure(
                f"The model `{self._model}` is at capacity. Please retry shortly.",
                retry_after_s=self._overload_retry_after_s,
                overloaded=True,
            )
        except Exception as exc:  # replica died mid-request, or could not be reached
            complete = True
            logger.error("engine %s failed request %s with %s", self._model, request_id, type(exc).__name__)
            yield self._lost()
        finally:
            if not complete and responses is not None:
                responses.cancel()  # the client went away: abort the request in the engine

    def _lost(self) -> EngineFailure:
        """A request the engine failed: not ready until the watch's next probe says otherwise (it probes at once)."""
        self._ready = False
        self._wake.set()
        return EngineFailure("The model's engine is unavailable. Please retry shortly.")

    async def watch(self) -> None:
        """Keeps ``ready`` current: probes the engine deployment, quickly while it is not ready.

        A probe that times out changes nothing: a saturated replica answers late (the probe queues behind
        requests) but is not down. Errors, a failed request (``generate``) or a dead engine make it not ready.
        """
        while True:
            try:
                self._ready = bool(await asyncio.wait_for(self._handle.ready.remote(), READY_PROBE_TIMEOUT_S))
            except asyncio.CancelledError:
                raise
            except TimeoutError:
                pass
            except Exception:
                self._ready = False
            self._wake.clear()
            period = READY_PROBE_PERIOD_S if self._ready else NOT_READY_PROBE_PERIOD_S
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), period)


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


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    def __init__(
        self,
        spec: IngressSpec,
        tokenizer: DeploymentHandle,
        engines: dict[str, DeploymentHandle],
        billing: DeploymentHandle,
    ) -> None:
        tracing.configure("anker-ingress")
        self._engines = {
            name: ServeEngineClient(name, handle, spec.overload_retry_after_s) for name, handle in engines.items()
        }
        self._tasks: list[asyncio.Task[None]] = []
        self._billing = ServeBillingClient(
            billing, spec.key_cache_ttl_s, spec.usage_flush_interval_s, spec.usage_spool_dir
        )
        self._service = OpenAIService(spec.models, ServeTokenizerClient(tokenizer), dict(self._engines), self._billing)
        self._max_body_bytes = spec.max_body_bytes

    def __serve_build_asgi_app__(self) -> Any:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(engine.watch()) for engine in self._engines.values()]
        self._tasks.append(loop.create_task(self._billing.outbox.run()))
        self._tasks.append(loop.create_task(self._report_pending()))
        gate = DrainGate(create_app(self._service, self._billing, self._max_body_bytes, _serve_request_id))
        context = serve.get_replica_context()
        replica = context.replica_id.to_full_id_str()
        outbox = self._billing.outbox
        self._tasks.append(loop.create_task(watch_drain(gate, context.app_name, replica, lambda: outbox.pending)))
        return gate

    async def _report_pending(self) -> None:
        replica = serve.get_replica_context().replica_id.unique_id
        while True:
            metrics.usage_pending(replica, self._billing.outbox.pending)
            await asyncio.sleep(2.0)

    async def __del__(self) -> None:
        # Ray Serve is stopping this replica: hand over the usage it still holds before it goes.
        if not await self._billing.outbox.drain(timeout_s=10.0):
            logger.error(
                "ingress stopping with %d usage reports undelivered; they stay in its spool file for the next replica",
                self._billing.outbox.pending,
            )
        self._billing.outbox.close()


def _serve_request_id() -> str | None:
    """Ray Serve's id of the current request: the one in its access log and in the ``X-Request-Id`` it sends."""
    from ray.serve.context import _get_serve_request_context

    return _get_serve_request_context().request_id or None
