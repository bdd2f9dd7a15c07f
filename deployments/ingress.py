"""The ingress deployment: serves the OpenAI app and reaches the tokenizer and engines through deployment handles.

It owns the handle adapters (Ray errors become ``EngineUnavailable``/``EngineFailure`` values), engine readiness,
and the cached key look-ups. It never tokenizes, never generates, and never logs request content.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from deployments.contracts import ChatTurn, EngineFailure, Prepared, Sampling
from deployments.errors import AnkerError, EngineUnavailable
from deployments.keys import KeyRecord, KeyStore, open_key_store
from deployments.openai.app import create_app
from deployments.openai.serving import EngineItem, OpenAIService, ServedModel

logger = logging.getLogger("ray.serve")

READY_PROBE_TIMEOUT_S = 10.0
READY_PROBE_PERIOD_S = 5.0
NOT_READY_PROBE_PERIOD_S = 1.0


@dataclass(frozen=True)
class IngressSpec:
    models: tuple[ServedModel, ...]
    data_dir: Path
    database_url: str | None
    max_body_bytes: int
    key_cache_ttl_s: float = 10.0


class ServeTokenizerClient:
    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle

    async def _call(self, method: str, *args: Any) -> Any:
        try:
            result = await getattr(self._handle, method).remote(*args)
        except Exception as exc:
            logger.error("tokenizer call failed with %s", type(exc).__name__)
            raise EngineUnavailable("The tokenizer stage is unavailable. Please retry shortly.") from None
        if isinstance(result, AnkerError):
            raise result
        return result

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

    def __init__(self, model: str, handle: DeploymentHandle) -> None:
        self._model = model
        self._handle = handle
        self._stream = handle.options(stream=True)
        self._ready = False
        self._wake = asyncio.Event()

    @property
    def ready(self) -> bool:
        return self._ready

    async def generate(
        self, request_id: str, prepared: Prepared, sampling: Sampling
    ) -> AsyncGenerator[EngineItem, None]:
        responses = self._stream.generate.remote(request_id, prepared.token_ids, sampling, prepared.max_tokens)
        assert isinstance(responses, DeploymentResponseGenerator)
        complete = False
        try:
            async for item in responses:
                yield item
            complete = True
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:  # replica died mid-request, or could not be reached
            logger.error("engine %s failed request %s with %s", self._model, request_id, type(exc).__name__)
            self._ready = False
            self._wake.set()
            yield EngineFailure("The model's engine is unavailable. Please retry shortly.")
            complete = True
        finally:
            if not complete:
                responses.cancel()  # the client went away: abort the request in the engine

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


class CachedKeyVerifier:
    """Key look-ups off the event loop; valid keys are cached briefly, misses never (a new key works at once)."""

    def __init__(self, store: KeyStore, ttl_s: float) -> None:
        self._store = store
        self._ttl_s = ttl_s
        self._cache: dict[str, tuple[float, KeyRecord]] = {}

    async def verify(self, key: str) -> KeyRecord | None:
        hit = self._cache.get(key)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1]
        record = await asyncio.to_thread(self._store.verify, key)
        if record is not None:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[key] = (now + self._ttl_s, record)
        return record


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    def __init__(self, spec: IngressSpec, tokenizer: DeploymentHandle, engines: dict[str, DeploymentHandle]) -> None:
        self._engines = {name: ServeEngineClient(name, handle) for name, handle in engines.items()}
        self._watchers: list[asyncio.Task[None]] = []
        store = open_key_store(spec.data_dir, spec.database_url)
        self._service = OpenAIService(spec.models, ServeTokenizerClient(tokenizer), dict(self._engines))
        self._keys = CachedKeyVerifier(store, spec.key_cache_ttl_s)
        self._max_body_bytes = spec.max_body_bytes

    def __serve_build_asgi_app__(self) -> Any:
        loop = asyncio.get_running_loop()
        self._watchers = [loop.create_task(engine.watch()) for engine in self._engines.values()]
        return create_app(self._service, self._keys, self._max_body_bytes, _serve_request_id)


def _serve_request_id() -> str | None:
    """Ray Serve's id of the current request: the one in its access log and in the ``X-Request-Id`` it sends."""
    from ray.serve.context import _get_serve_request_context

    return _get_serve_request_context().request_id or None
