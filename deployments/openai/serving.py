"""Serving logic of the OpenAI routes: validated request in, tokenizer and engine calls, response or SSE stream out.

It talks to the other stages only through the ``TokenizerClient`` / ``EngineClient`` protocols (real deployment
handles in production, named doubles in tests) and never keeps or logs prompt or completion text.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Protocol

from deployments.contracts import ChatTurn, Delta, EngineFailure, Prepared, Sampling
from deployments.errors import AnkerError, EngineUnavailable, ModelNotFound
from deployments.openai import responses as wire
from deployments.openai import sse
from deployments.openai.errors import error_body
from deployments.openai.protocol import ChatCompletionRequest, CompletionRequest

logger = logging.getLogger("ray.serve")

EngineItem = list[Delta] | EngineFailure


class TokenizerClient(Protocol):
    async def prepare_chat(self, model: str, turns: list[ChatTurn], max_tokens: int | None) -> Prepared: ...

    async def prepare_completion(
        self, model: str, prompts: list[str | list[int]], max_tokens: int | None
    ) -> list[Prepared]: ...


class EngineClient(Protocol):
    @property
    def ready(self) -> bool: ...

    def generate(self, request_id: str, prepared: Prepared, sampling: Sampling) -> AsyncGenerator[EngineItem, None]: ...


@dataclass(frozen=True)
class ServedModel:
    name: str
    max_model_len: int
    owned_by: str
    created: int


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
        self, models: Sequence[ServedModel], tokenizer: TokenizerClient, engines: dict[str, EngineClient]
    ) -> None:
        self._models = {m.name: m for m in models}
        self._tokenizer = tokenizer
        self._engines = engines

    # -- models -------------------------------------------------------------------------------------------------

    def list_models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [wire.model_card(m.name, m.created, m.owned_by, m.max_model_len) for m in self._models.values()],
        }

    def get_model(self, name: str) -> dict[str, Any]:
        m = self._model(name)
        return wire.model_card(m.name, m.created, m.owned_by, m.max_model_len)

    def readiness(self) -> dict[str, bool]:
        return {name: engine.ready for name, engine in self._engines.items()}

    def _model(self, name: str) -> ServedModel:
        model = self._models.get(name)
        if model is None:
            raise ModelNotFound(f"The model `{name}` does not exist or you do not have access to it.", "model")
        return model

    def _engine(self, name: str) -> EngineClient:
        self._model(name)
        engine = self._engines[name]
        if not engine.ready:
            raise EngineUnavailable(f"The model `{name}` is starting up or restarting. Please retry shortly.")
        return engine

    # -- engine streams -----------------------------------------------------------------------------------------

    async def _merged(
        self, engine: EngineClient, request_id: str, prepared: list[Prepared], sampling: Sampling
    ) -> AsyncGenerator[tuple[int, list[Delta]], None]:
        """One stream of (prompt index, deltas) over all prompts; an engine failure becomes ``EngineUnavailable``."""
        if len(prepared) == 1:
            async with aclosing(engine.generate(request_id, prepared[0], sampling)) as stream:
                async for item in stream:
                    if isinstance(item, EngineFailure):
                        raise EngineUnavailable(item.reason, retry_after_s=item.retry_after_s)
                    yield 0, item
            return

        queue: asyncio.Queue[tuple[int, EngineItem | None]] = asyncio.Queue()

        async def pump(index: int, p: Prepared) -> None:
            try:
                async with aclosing(engine.generate(f"{request_id}-{index}", p, sampling)) as stream:
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
                    raise EngineUnavailable(entry.reason, retry_after_s=entry.retry_after_s)
                else:
                    yield index, entry
            for task in tasks:
                task.result()  # surface an exception a pump may have ended with
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

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

    async def chat(self, req: ChatCompletionRequest, request_id: str) -> dict[str, Any] | AsyncIterator[bytes]:
        engine = self._engine(req.model)
        turns = [
            ChatTurn(role="system" if m.role == "developer" else m.role, content=m.text(i), name=m.name)
            for i, m in enumerate(req.messages)
        ]
        prepared = await self._tokenizer.prepare_chat(req.model, turns, req.requested_max_tokens)
        sampling = _sampling(req, req.logprobs_k)
        acc = wire.Accumulator([prepared.prompt_tokens], req.n)
        stream = self._merged(engine, request_id, [prepared], sampling)
        created = int(time.time())
        with_logprobs = req.logprobs_k is not None
        if not req.stream:
            async with aclosing(stream):
                async for prompt_index, deltas in stream:
                    for delta in deltas:
                        acc.add(prompt_index, delta)
            self._log_usage(request_id, req.model, acc.usage, "ok")
            return wire.chat_completion(request_id, created, req.model, acc, with_logprobs)

        first, stream = await self._primed(stream)
        header = wire.ChunkHeader(request_id, created, req.model, req.include_usage)
        return self._chat_events(header, acc, first, stream, with_logprobs)

    async def _chat_events(
        self,
        header: wire.ChunkHeader,
        acc: wire.Accumulator,
        first: tuple[int, list[Delta]] | None,
        stream: AsyncGenerator[tuple[int, list[Delta]], None],
        with_logprobs: bool,
    ) -> AsyncIterator[bytes]:
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
            yield sse.event(error_body(error))
        finally:
            self._log_usage(header.request_id, header.model, acc.usage, status)
        yield sse.DONE

    # -- completions --------------------------------------------------------------------------------------------

    async def completion(self, req: CompletionRequest, request_id: str) -> dict[str, Any] | AsyncIterator[bytes]:
        engine = self._engine(req.model)
        prepared = await self._tokenizer.prepare_completion(req.model, req.prompts(), req.max_tokens)
        sampling = _sampling(req, req.logprobs)
        acc = wire.Accumulator([p.prompt_tokens for p in prepared], req.n)
        stream = self._merged(engine, request_id, prepared, sampling)
        created = int(time.time())
        with_logprobs = req.logprobs is not None
        if not req.stream:
            async with aclosing(stream):
                async for prompt_index, deltas in stream:
                    for delta in deltas:
                        acc.add(prompt_index, delta)
            self._log_usage(request_id, req.model, acc.usage, "ok")
            return wire.text_completion(request_id, created, req.model, acc, with_logprobs)

        first, stream = await self._primed(stream)
        header = wire.ChunkHeader(request_id, created, req.model, req.include_usage)
        return self._completion_events(header, acc, first, stream, with_logprobs)

    async def _completion_events(
        self,
        header: wire.ChunkHeader,
        acc: wire.Accumulator,
        first: tuple[int, list[Delta]] | None,
        stream: AsyncGenerator[tuple[int, list[Delta]], None],
        with_logprobs: bool,
    ) -> AsyncIterator[bytes]:
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
            yield sse.event(error_body(error))
        finally:
            self._log_usage(header.request_id, header.model, acc.usage, status)
        yield sse.DONE

    # -- shared -------------------------------------------------------------------------------------------------

    @staticmethod
    async def _chained(
        first: tuple[int, list[Delta]] | None, stream: AsyncGenerator[tuple[int, list[Delta]], None]
    ) -> AsyncGenerator[tuple[int, list[Delta]], None]:
        async with aclosing(stream):
            if first is not None:
                yield first
                async for item in stream:
                    yield item

    @staticmethod
    def _log_usage(request_id: str, model: str, usage: wire.Usage, status: str) -> None:
        # Counts and ids only: this line is what zero data retention allows to be kept.
        logger.info(
            "usage request_id=%s model=%s status=%s prompt_tokens=%d cached_tokens=%d completion_tokens=%d",
            request_id,
            model,
            status,
            usage.prompt_tokens,
            usage.cached_tokens,
            usage.completion_tokens,
        )
