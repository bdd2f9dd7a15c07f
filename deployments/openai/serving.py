"""Serving logic of the OpenAI routes: validated request in, tokenizer and engine calls, response or SSE stream out.

It talks to the other stages only through the ``TokenizerClient`` / ``EngineClient`` / ``BillingGate`` protocols
(real deployment handles in production, named doubles in tests) and never keeps or logs prompt or completion text.
Billing is on the request path: a request is admitted (rate limits, budget reservation) after tokenization and
before the engine, and its usage report is queued in a ``finally`` that every ending passes through, streams cut
off by the client included (``deployments/openai/usage.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from contextlib import aclosing, contextmanager
from typing import Any, Protocol

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

from deployments.billing.governance import check_caller_role
from deployments.contracts import Admission, AdmissionRequest, ChatTurn, Delta, EngineFailure, Prepared, Sampling
from deployments.errors import (
    AnkerError,
    EngineOverloaded,
    EngineUnavailable,
)
from deployments.keys import KeyRecord
from deployments.openai import responses as wire
from deployments.openai import sse
from deployments.openai.catalog import ModelCatalog, ServedModel
from deployments.openai.errors import error_body
from deployments.openai.protocol import ChatCompletionRequest, CompletionRequest
from deployments.openai.usage import BillingGate, RequestContext, UsageTracker, status_of
from deployments.tokenizer import isolated
from observability import tracing

logger = logging.getLogger("ray.serve")

EngineItem = list[Delta] | EngineFailure


def engine_error(failure: EngineFailure) -> EngineUnavailable | EngineOverloaded:
    """The client's error for an engine's failure: 503 with Retry-After either way."""
    kind = EngineOverloaded if failure.overloaded else EngineUnavailable
    return kind(failure.reason, retry_after_s=failure.retry_after_s)


REGION_HEADER = "x-anker-processing-region"


class TokenizerClient(Protocol):
    async def prepare_chat(self, model: str, turns: list[ChatTurn], max_tokens: int | None) -> Prepared: ...

    async def prepare_completion(
        self, model: str, prompts: list[str | list[int]], max_tokens: int | None
    ) -> list[Prepared]: ...


class EngineClient(Protocol):
    @property
    def ready(self) -> bool: ...

    def generate(
        self, request_id: str, prepared: Prepared, sampling: Sampling, trace: tracing.Carrier | None = None
    ) -> AsyncGenerator[EngineItem, None]: ...


def _sampling(req: ChatCompletionRequest | CompletionRequest, logprobs: int | None) -> Sampling:
    top_p = req.top_p
    if top_p == 0.0:
        top_p = 1e-9  # OpenAI accepts 0 (only the top token); the engine needs a positive value
    return Sampling(
        n=req.n,
        temperature=req.temperature,
        top_p=top_p,
        seed=req.seed,
        stop=req.stop_list(),
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logprobs=logprobs,
    )


class OpenAIService:
    def __init__(
        self,
        models: Sequence[ServedModel],
        tokenizer: TokenizerClient,
        engines: dict[str, EngineClient],
        billing: BillingGate,
    ) -> None:
        self._catalog = ModelCatalog(models)
        self._tokenizer = tokenizer
        self._engines = engines
        self._billing = billing

    # -- models -------------------------------------------------------------------------------------------------

    def list_models(self, key: KeyRecord) -> dict[str, Any]:
        return self._catalog.list_models(key)

    def get_model(self, name: str, key: KeyRecord) -> dict[str, Any]:
        return self._catalog.get_model(name, key)

    def _authorize(self, name: str, key: KeyRecord) -> None:
        check_caller_role(key)
        self._catalog.allowed(name, key)

    async def _admit(self, ctx: RequestContext, model: str, prepared: Sequence[Prepared], n: int) -> Admission:
        with tracing.span("admission", kind=SpanKind.CLIENT, attrs={"anker.billing_id": ctx.billing_id}):
            admission = await self._billing.admit(
                ctx.key,
                AdmissionRequest(
                    billing_id=ctx.billing_id,
                    key_id=ctx.key.key_id,
                    tenant=ctx.key.tenant,
                    model=model,
                    prompt_tokens=sum(p.prompt_tokens for p in prepared),
                    max_output_tokens=sum(p.max_tokens for p in prepared) * n,
                    trace=tracing.inject(),
                ),
            )
        ctx.headers.update(admission.rate_limit_headers)
        return admission

    def readiness(self) -> dict[str, bool]:
        return {name: engine.ready for name, engine in self._engines.items()}

    def _engine(self, name: str) -> EngineClient:
        self._catalog.model(name)
        engine = self._engines[name]
        if not engine.ready:
            raise EngineUnavailable(f"The model `{name}` is starting up or restarting. Please retry shortly.")
        return engine

    # -- engine streams -----------------------------------------------------------------------------------------

    async def _merged(
        self, engine_model: str, request_id: str, prepared: list[Prepared], sampling: Sampling
    ) -> AsyncGenerator[tuple[int, list[Delta]], None]:
        """One stream of (prompt index, deltas) over all prompts; an engine failure becomes ``EngineUnavailable``."""
        engine = self._engines[engine_model]
        if len(prepared) == 1:
            with _route(engine_model, request_id) as carrier:
                async with aclosing(engine.generate(request_id, prepared[0], sampling, carrier)) as stream:
                    async for item in stream:
                        if isinstance(item, EngineFailure):
                            raise engine_error(item)
                        yield 0, item
            return

        queue: asyncio.Queue[tuple[int, EngineItem | None]] = asyncio.Queue()

        async def pump(index: int, p: Prepared) -> None:
            try:
                with _route(engine_model, f"{request_id}-{index}") as carrier:
                    async with aclosing(engine.generate(f"{request_id}-{index}", p, sampling, carrier)) as stream:
                        async for item in stream:
                            await queue.put((index, item))
            finally:
                await queue.put((index, None))

        tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(prepared)]
        try:
            remaining = len(tasks)
            while remaining:
                index, entry = await queue.get()
                if entry is None:
                    remaining -= 1
                elif isinstance(entry, EngineFailure):
                    raise engine_error(entry)
                else:
                    yield index, entry
            for task in tasks:
                task.result()  # surface an exception a pump may have ended with
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    @staticmethod
    async def _timed(
        ctx: RequestContext, stream: AsyncGenerator[tuple[int, list[Delta]], None]
    ) -> AsyncGenerator[tuple[int, list[Delta]], None]:
        """Notes when the first output token arrived (time to first token)."""
        async with aclosing(stream):
            async for item in stream:
                if ctx.first_token_s is None and any(d.token_ids for d in item[1]):
                    ctx.first_token_s = time.monotonic()
                yield item

    async def _primed(
        self, stream: AsyncGenerator[tuple[int, list[Delta]], None]
    ) -> tuple[tuple[int, list[Delta]] | None, AsyncGenerator[tuple[int, list[Delta]], None]]:
        """Waits for the first engine output, so that a request the engine cannot take still gets an HTTP error."""
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            return None, stream
        except BaseException:
            await stream.aclose()  # e.g. the client left while waiting: abort the engine request now
            raise
        return first, stream

    # -- chat ---------------------------------------------------------------------------------------------------

    async def chat(self, req: ChatCompletionRequest, ctx: RequestContext) -> dict[str, Any] | AsyncIterator[bytes]:
        self._authorize(req.model, ctx.key)
        self._engine(req.model)  # 503 now if the model's engine is not ready
        turns = [
            ChatTurn(role="system" if m.role == "developer" else m.role, content=m.text(i), name=m.name)
            for i, m in enumerate(req.messages)
        ]
        prepared = await self._tokenizer.prepare_chat(req.model, turns, req.requested_max_tokens)
        return await self._run(
            req, ctx, [prepared], _sampling(req, req.logprobs_k), wire.chat_completion, self._chat_events
        )

    async def _chat_events(
        self,
        header: wire.ChunkHeader,
        acc: wire.Accumulator,
        first: tuple[int, list[Delta]] | None,
        stream: AsyncGenerator[tuple[int, list[Delta]], None],
        with_logprobs: bool,
        tracker: UsageTracker,
    ) -> AsyncGenerator[bytes, None]:
        status = "cancelled"
        try:
            for index in range(len(acc.choices)):
                yield sse.event(wire.chat_chunk(header, [wire.chat_delta_choice(index, None, True, False)]))
            async for prompt_index, deltas in self._chained(first, stream):
                for delta in deltas:
                    index = acc.add(prompt_index, delta)
                    if delta.text or delta.finish_reason or (with_logprobs and delta.logprobs):
                        choice = wire.chat_delta_choice(index, delta, False, with_logprobs)
                        yield sse.event(wire.chat_chunk(header, [choice]))
            if header.include_usage:
                yield sse.event(wire.usage_chunk(wire.chat_chunk(header, []), acc.usage))
            status = "ok"
        except AnkerError as error:
            status = error.code or "error"
            if header.include_usage:  # what the cut-off stream is billed for, so that the client can reconcile
                yield sse.event(wire.usage_chunk(wire.chat_chunk(header, []), acc.usage))
            yield sse.event(error_body(error))
        finally:
            tracker.finish(status)
        yield sse.DONE

    # -- completions --------------------------------------------------------------------------------------------

    async def completion(self, req: CompletionRequest, ctx: RequestContext) -> dict[str, Any] | AsyncIterator[bytes]:
        self._authorize(req.model, ctx.key)
        self._engine(req.model)  # 503 now if the model's engine is not ready
        prepared = await self._tokenizer.prepare_completion(req.model, req.prompts(), req.max_tokens)
        return await self._run(
            req, ctx, prepared, _sampling(req, req.logprobs), wire.text_completion, self._completion_events
        )

    async def _completion_events(
        self,
        header: wire.ChunkHeader,
        acc: wire.Accumulator,
        first: tuple[int, list[Delta]] | None,
        stream: AsyncGenerator[tuple[int, list[Delta]], None],
        with_logprobs: bool,
        tracker: UsageTracker,
    ) -> AsyncGenerator[bytes, None]:
        status = "cancelled"
        offsets = [0] * len(acc.choices)
        try:
            async for prompt_index, deltas in self._chained(first, stream):
                for delta in deltas:
                    index = acc.add(prompt_index, delta)
                    if delta.text or delta.finish_reason or (with_logprobs and delta.logprobs):
                        choice = wire.completion_delta_choice(index, delta, with_logprobs, offsets[index])
                        offsets[index] += len(delta.text)
                        yield sse.event(wire.completion_chunk(header, [choice]))
            if header.include_usage:
                yield sse.event(wire.usage_chunk(wire.completion_chunk(header, []), acc.usage))
            status = "ok"
        except AnkerError as error:
            status = error.code or "error"
            if header.include_usage:
                yield sse.event(wire.usage_chunk(wire.completion_chunk(header, []), acc.usage))
            yield sse.event(error_body(error))
        finally:
            tracker.finish(status)
        yield sse.DONE

    # -- shared -------------------------------------------------------------------------------------------------

    async def _run(
        self,
        req: ChatCompletionRequest | CompletionRequest,
        ctx: RequestContext,
        prepared: list[Prepared],
        sampling: Sampling,
        respond: Callable[[str, int, str, wire.Accumulator, bool], dict[str, Any]],
        events: Callable[..., AsyncGenerator[bytes, None]],
    ) -> dict[str, Any] | AsyncIterator[bytes]:
        """Admission, then generation into a response or an SSE stream; the usage report leaves however it ends."""
        prepared = [isolated(p, ctx.key.tenant) for p in prepared]  # each organisation its own prefix cache
        ctx.headers[REGION_HEADER] = self._catalog.models[req.model].region  # where the request is processed
        ctx.model = req.model
        tracing.set_attributes(
            trace.get_current_span(),
            {
                "anker.request_id": ctx.request_id,
                "anker.billing_id": ctx.billing_id,
                "anker.model": req.model,
                "anker.tenant": ctx.key.tenant,
                "anker.key_id": ctx.key.key_id,
                "anker.stream": bool(req.stream),
                "anker.n": req.n,
            },
        )
        acc = wire.Accumulator([p.prompt_tokens for p in prepared], req.n)
        admission = await self._admit(ctx, req.model, prepared, req.n)
        tracker = UsageTracker(self._billing, ctx, req.model, acc, admission)
        created = int(time.time())
        with_logprobs = sampling.logprobs is not None
        try:
            stream = self._timed(ctx, self._merged(req.model, ctx.request_id, prepared, sampling))
            if not req.stream:
                async with aclosing(stream):
                    async for prompt_index, deltas in stream:
                        for delta in deltas:
                            acc.add(prompt_index, delta)
                tracker.finish("ok")
                return respond(ctx.request_id, created, req.model, acc, with_logprobs)
            first, stream = await self._primed(stream)
        except BaseException as error:
            tracker.finish(status_of(error))
            raise
        header = wire.ChunkHeader(ctx.request_id, created, req.model, req.include_usage)
        generator = events(header, acc, first, stream, with_logprobs, tracker)
        weakref.finalize(generator, tracker.finish, "cancelled")  # a stream the server never started still reports
        return generator

    @staticmethod
    async def _chained(
        first: tuple[int, list[Delta]] | None, stream: AsyncGenerator[tuple[int, list[Delta]], None]
    ) -> AsyncGenerator[tuple[int, list[Delta]], None]:
        async with aclosing(stream):
            if first is not None:
                yield first
                async for item in stream:
                    yield item


@contextmanager
def _route(model: str, request_id: str) -> Iterator[tracing.Carrier]:
    """The routing decision (the model's engine deployment) as a client span; yields the carrier for the engine.

    Not made current: it lives across the stream's yields, which may resume in other contexts.
    """
    span = tracing.tracer().start_span(
        "engine.route",
        kind=SpanKind.CLIENT,
        attributes=tracing.checked({"anker.engine_deployment": model, "anker.request_id": request_id}),
    )
    carrier: tracing.Carrier = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    try:
        yield carrier
    except (asyncio.CancelledError, GeneratorExit):
        span.set_attribute("anker.status", "cancelled")
        raise
    finally:
        span.end()
