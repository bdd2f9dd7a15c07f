"""Metering from the engine's own outputs: every ``generate`` that vLLM's serving layer starts for an HTTP request
is counted (prompt, cached prompt and output tokens), finished, cut off or cancelled alike, and the request's counts
are reported once, when the request ends.

It sits between vLLM's serving layer and ``AsyncLLM`` (``MeteredEngineClient``), so no endpoint can stream a token
that is not counted. Counts only: never text, never token ids beyond their number.

Admission sits there too: vLLM has tokenized the prompts when it calls ``generate``, so the request's prompt tokens
and most output tokens are known exactly. vLLM makes every engine request of an HTTP request (one per prompt of a
completions batch) before it runs any, so the meter admits them together, once, as the first one starts; a request
that is refused never reaches the engine, and the refusal is kept on the meter for the endpoint to answer with.

So do the deadlines of the engine's outputs (``Deadlines``): an engine request whose next output is late is aborted,
and the meter keeps how long it waited, for the endpoint to answer with.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Mapping
from contextlib import aclosing, contextmanager
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
    admitted: bool = False  # admission let it run (with no admission: never)
    engine_failed: bool = False  # the engine raised in one of its generations (not a cancellation)


@dataclass(frozen=True)
class Deadlines:
    """How long the engine may keep an HTTP request waiting for its next output (the config's ``server``). A whole
    answer comes as one output, so ``request_s`` bounds all of it, queue, prefill and decoding; a stream's first
    output (its queue and prefill) has as long, and each one after it ``stream_idle_s``."""

    request_s: float  # server.request_timeout_s
    stream_idle_s: float  # server.stream_idle_timeout_s


# Admits one HTTP request's engine work before any of it runs: (prompt tokens, most output tokens), summed over its
# engine requests. Raises an ``AnkerError`` to refuse it.
Admit = Callable[[int, int], Awaitable[None]]


class RequestMeter:
    """The counts of one HTTP request, summed over the engine requests it starts, and its admission."""

    def __init__(
        self, admit: Admit | None = None, cache_salt: str | None = None, deadlines: Deadlines | None = None
    ) -> None:
        self.cache_salt = cache_salt  # the caller's own prefix cache (vLLM's cache_salt), set on every engine request
        self.deadlines = deadlines  # none: the engine may take as long as it takes
        self.stalled_s: float | None = None  # the wait for an engine output that ran out, if one did
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.output_tokens = 0
        self.generations = 0
        self.unfinished = 0
        self.engine_failures = 0  # generations the engine ended by raising, not by finishing or being cancelled
        self._admit = admit
        self.planned_prompt_tokens = 0  # of the engine requests made so far, as vLLM hands them over
        self.planned_output_tokens = 0
        self.refusal: Exception | None = None  # admission's refusal, for the endpoint to answer with
        self._admission: asyncio.Future[None] | None = None
        self._running: set[_Generation] = set()  # engine requests under way: counted into the meter as they end

    def paced(self, outputs: AsyncGenerator[Any], whole: bool) -> AsyncGenerator[Any]:
        """The engine's ``outputs`` for this request, each within its deadline (``whole``: one output, the whole
        answer)."""
        return outputs if self.deadlines is None else _paced(outputs, self, self.deadlines, whole)

    def plan(self, prompt: Any, sampling_params: Any) -> None:
        """An engine request vLLM has made (not yet started): its prompt's tokens and its most output tokens."""
        self.planned_prompt_tokens += _prompt_tokens(prompt)
        self.planned_output_tokens += (sampling_params.max_tokens or 0) * max(1, sampling_params.n or 1)

    async def admission(self) -> None:
        """Runs the admission once for everything planned so far; every engine request of this HTTP request waits
        for it, and a refusal is raised in each."""
        if self._admit is None:
            return
        if self._admission is None:
            self._admission = asyncio.get_running_loop().create_future()
            try:
                await self._admit(self.planned_prompt_tokens, self.planned_output_tokens)
            except asyncio.CancelledError:  # the client went away while it was being admitted
                self._admission.cancel()
                raise
            except Exception as exc:
                self.refusal = exc
                self._admission.set_exception(exc)
                self._admission.exception()  # retrieved here; each engine request raises it again below
                raise
            self._admission.set_result(None)
            return
        await asyncio.shield(self._admission)

    @property
    def settled(self) -> bool:
        """Admission has answered: the request may run, or ``refusal`` says why not."""
        return self._admit is None or (self._admission is not None and self._admission.done())

    @property
    def admitted(self) -> bool:
        a = self._admission
        return a is not None and a.done() and not a.cancelled() and a.exception() is None

    def so_far(self) -> tuple[int, int, int]:
        """(prompt, cached, output) tokens so far, the engine requests under way included."""
        prompt, cached, output = self.prompt_tokens, self.cached_tokens, self.output_tokens
        for generation in self._running:
            prompt += generation.prompt_tokens
            cached += generation.cached_tokens
            output += sum(generation.output_tokens.values())
        return prompt, cached, output

    def result(self) -> Metered:
        """The request's counts as it ends, the engine requests whose generators are still open included, with
        what they have done so far: a client that left mid-stream can end the HTTP request before its engine
        request's generator is closed (Python closes an abandoned async generator later, from the event loop).
        Such an engine request finished only if its last output came. A request that started no engine request did
        not finish either."""
        prompt, cached, output = self.so_far()
        started = self.generations + len(self._running)
        return Metered(
            prompt,
            cached,
            output,
            started,
            started > 0 and self.unfinished == 0 and all(g.finished for g in self._running),
            self.admitted,
            self.engine_failures > 0,
        )


def _prompt_tokens(prompt: Any) -> int:
    """The number of tokens of a prompt as vLLM's serving layer hands it to the engine (tokenized)."""
    token_ids = prompt.get("prompt_token_ids") if isinstance(prompt, Mapping) else None
    return len(token_ids or ())


_current: contextvars.ContextVar[RequestMeter | None] = contextvars.ContextVar("anker_request_meter", default=None)


@contextmanager
def metering(
    report: Callable[[Metered], None],
    admit: Admit | None = None,
    cache_salt: str | None = None,
    deadlines: Deadlines | None = None,
) -> Iterator[RequestMeter]:
    """Meters the engine work started inside this block (and in the tasks it starts, such as a streaming
    response's), admits it with ``admit`` before it runs, keeps it in the prefix cache of ``cache_salt``, holds its
    outputs to ``deadlines``, and calls ``report`` once when the block ends, however it ends."""
    meter = RequestMeter(admit, cache_salt, deadlines)
    token = _current.set(meter)
    try:
        yield meter
    finally:
        _current.reset(token)
        report(meter.result())


def current_meter() -> RequestMeter | None:
    """The meter of the HTTP request being served here, if any."""
    return _current.get()


class _Watchdog:
    """One engine request's deadline for its next output, on one timer a request. ``asyncio.timeout`` per output
    made and cancelled a timer for every output (measured alone: ~6 µs an output, against ~1.5 µs this way); this timer
    is moved only when it fires before the deadline (at most once a deadline's length, 60 s by default) or when a
    shorter deadline begins (a stream's first output has ``request_s``, each next one ``stream_idle_s``).

    When the deadline passes while the request waits, it cancels the waiting task, as ``asyncio.timeout`` does: the
    wait is cancelled inside vLLM's ``generate``, which aborts the engine request."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._deadline: float | None = None  # by when the awaited output must come (loop time); None: not waiting
        self._task: asyncio.Task[Any] | None = None  # the task waiting for it
        self._timer: asyncio.TimerHandle | None = None
        self.fired = False  # it cancelled the waiting task

    def waiting(self, wait_s: float) -> None:
        self._deadline = self._loop.time() + wait_s
        self._task = asyncio.current_task()
        if self._timer is not None and self._timer.when() > self._deadline:  # a shorter wait (a stream's next)
            self._timer.cancel()
            self._timer = None
        if self._timer is None:
            self._timer = self._loop.call_at(self._deadline, self._check)

    def received(self) -> None:
        self._deadline = self._task = None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        if self._deadline is None or self._task is None:
            return  # not waiting: the next wait sets the timer again
        if self._loop.time() < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._check)  # an output came since it was set
            return
        self.fired = True
        self._task.cancel()


async def _paced(
    outputs: AsyncGenerator[Any], meter: RequestMeter, deadlines: Deadlines, whole: bool
) -> AsyncGenerator[Any]:
    """Each of the engine's ``outputs`` within its deadline. A late one's wait is cancelled, which makes vLLM's
    ``AsyncLLM.generate`` abort the engine request (the engine stops working on it); the meter keeps how long it
    waited, and the generation fails as vLLM's own generations fail (``GenerationError``), which its streams end
    with an error event."""
    wait_s = deadlines.request_s
    watchdog = _Watchdog()
    try:
        async with aclosing(outputs):
            while True:
                watchdog.waiting(wait_s)
                try:
                    output = await anext(outputs)
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if not watchdog.fired or task is None or task.uncancel() > 0:
                        raise  # cancelled by someone else (the client left, the replica stops)
                    from vllm.exceptions import GenerationError

                    meter.stalled_s = wait_s
                    raise GenerationError("The engine produced no output in time.") from None
                finally:
                    watchdog.received()
                yield output
                if not whole:
                    wait_s = deadlines.stream_idle_s
    finally:
        watchdog.close()


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

    def generate(self, prompt: Any, sampling_params: Any, request_id: str, **kwargs: Any) -> AsyncGenerator[Any]:
        """Not itself a generator: the engine request is planned on the meter when vLLM makes it, before any of
        the HTTP request's engine requests starts (so that they are admitted together)."""
        meter = _current.get()
        if meter is None:  # a request outside any HTTP request (vLLM's own warm-up, say) is not metered
            return self._engine.generate(prompt, sampling_params, request_id, **kwargs)  # type: ignore[no-any-return]
        meter.plan(prompt, sampling_params)
        if meter.cache_salt is not None and isinstance(prompt, Mapping):
            prompt = {**prompt, "cache_salt": meter.cache_salt}  # over any the request had: no client sets its own
        return self._metered(meter, prompt, sampling_params, request_id, **kwargs)

    async def _metered(
        self, meter: RequestMeter, prompt: Any, sampling_params: Any, request_id: str, **kwargs: Any
    ) -> AsyncGenerator[Any]:
        from vllm.sampling_params import RequestOutputKind

        await meter.admission()
        generation = _Generation(delta=sampling_params.output_kind == RequestOutputKind.DELTA)
        # Handed to the engine, the prompt is processed (and cached) whether or not an output follows: a client
        # that leaves before its first token pays for its prompt. The engine reports cache hits with its first
        # output only, so until then none are counted.
        generation.prompt_tokens = _prompt_tokens(prompt)
        meter._running.add(generation)
        try:
            outputs = self._engine.generate(prompt, sampling_params, request_id, **kwargs)
            async for output in meter.paced(outputs, whole=sampling_params.output_kind == RequestOutputKind.FINAL_ONLY):
                generation.observe(output)
                yield output
        except Exception:  # the engine failed it (a cancellation or a closed stream is no Exception)
            meter.engine_failures += 1
            raise
        finally:
            meter._running.discard(generation)
            generation.add_to(meter)
