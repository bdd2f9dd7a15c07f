"""Metering from the engine's own outputs: every ``generate`` that vLLM's serving layer starts for an HTTP request
is counted (prompt, cached prompt and output tokens), finished, cut off or cancelled alike, and the request's counts
are reported once, when the request ends.

It sits between vLLM's serving layer and ``AsyncLLM`` (``MeteredEngineClient``), so no endpoint can stream a token
that is not counted. Counts only: never text, never token ids beyond their number.
"""

from __future__ import annotations

import contextvars
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Metered:
    """What one HTTP request made the engine do."""

    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    generations: int  # engine requests it started (one per prompt of a completions batch)
    finished: bool  # every generation ran to its end (stop or length), none was cut off or cancelled


class RequestMeter:
    """The counts of one HTTP request, summed over the engine requests it starts."""

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.output_tokens = 0
        self.generations = 0
        self.unfinished = 0

    def result(self) -> Metered:
        return Metered(
            self.prompt_tokens, self.cached_tokens, self.output_tokens, self.generations, self.unfinished == 0
        )


_current: contextvars.ContextVar[RequestMeter | None] = contextvars.ContextVar("anker_request_meter", default=None)


@contextmanager
def metering(report: Callable[[Metered], None]) -> Iterator[RequestMeter]:
    """Meters the engine work started inside this block (and in the tasks it starts, such as a streaming
    response's), and calls ``report`` once when the block ends, however it ends."""
    meter = RequestMeter()
    token = _current.set(meter)
    try:
        yield meter
    finally:
        _current.reset(token)
        report(meter.result())


class _Generation:
    """Counts of one engine request, from its ``RequestOutput`` values."""

    def __init__(self, delta: bool) -> None:
        self.delta = delta  # outputs carry only new tokens (streaming) rather than all so far
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.output_tokens: dict[int, int] = {}  # per choice index
        self.finished = False

    def observe(self, output: Any) -> None:
        if output.prompt_token_ids is not None:
            self.prompt_tokens = max(self.prompt_tokens, len(output.prompt_token_ids))
        self.cached_tokens = max(self.cached_tokens, output.num_cached_tokens or 0)
        for choice in output.outputs:
            new = len(choice.token_ids)
            seen = self.output_tokens.get(choice.index, 0)
            self.output_tokens[choice.index] = seen + new if self.delta else max(seen, new)
        self.finished = bool(output.finished)

    def add_to(self, meter: RequestMeter) -> None:
        meter.prompt_tokens += self.prompt_tokens
        meter.cached_tokens += self.cached_tokens
        meter.output_tokens += sum(self.output_tokens.values())
        meter.generations += 1
        meter.unfinished += 0 if self.finished else 1


class MeteredEngineClient:
    """vLLM's engine client as the serving layer sees it, with every ``generate`` counted into the current
    request's meter. Everything else is the engine client's own."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def generate(self, prompt: Any, sampling_params: Any, request_id: str, **kwargs: Any) -> AsyncGenerator[Any]:
        from vllm.sampling_params import RequestOutputKind

        meter = _current.get()
        if meter is None:  # a request outside any HTTP request (vLLM's own warm-up, say) is not metered
            async for output in self._engine.generate(prompt, sampling_params, request_id, **kwargs):
                yield output
            return
        generation = _Generation(delta=sampling_params.output_kind == RequestOutputKind.DELTA)
        try:
            async for output in self._engine.generate(prompt, sampling_params, request_id, **kwargs):
                generation.observe(output)
                yield output
        finally:
            generation.add_to(meter)
