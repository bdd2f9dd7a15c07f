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
import uuid
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.serve.context
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from deployments.billing.client import ServeBillingClient, call_deployment
from deployments.contracts import ChatTurn, EngineFailure, Prepared, Sampling
from deployments.drain import DrainGate, watch_drain
from deployments.errors import EngineUnavailable
from deployments.openai.app import create_app
from deployments.openai.catalog import ServedModel
from deployments.openai.serving import EngineItem, OpenAIService
from deployments.readiness import ReadinessWatch
from observability import metrics, tracing

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class IngressSpec:
    models: tuple[ServedModel, ...]
    max_body_bytes: int
    key_cache_ttl_s: float = 10.0
    usage_flush_interval_s: float = 0.2
    usage_spool_dir: Path | None = None  # this node's folder of usage spool files (see usage_outbox.Spool)
    overload_retry_after_s: int = 2


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
        self._readiness = ReadinessWatch(handle)

    @property
    def ready(self) -> bool:
        return self._readiness.ready

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
        self._readiness.lost()
        return EngineFailure("The model's engine is unavailable. Please retry shortly.")

    async def watch(self) -> None:
        await self._readiness.watch()


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
