"""Test doubles, named as such: stand-ins for a deployment handle, for the engine's placement, and for vLLM's
engine client (or around it) in tests and benchmarks that measure something other than generation.

They replace only what a test does not measure; the default path never uses them.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import inspect
from collections import Counter
from collections.abc import AsyncGenerator, Callable
from typing import Any


class InProcessHandleDouble:
    """Stands in for a Ray ``DeploymentHandle``: ``handle.method.remote(*args)`` calls the object's method in-process.

    Only the transport is replaced: the object behind it is the real deployment class. ``down`` makes every call
    fail the way an unreachable actor does. ``calls`` counts the calls made of each method, those that failed too:
    what a caller costs the deployment.
    """

    def __init__(self, target: object) -> None:
        self._target = target
        self.down = False
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> _RemoteMethod:
        return _RemoteMethod(self, name)


class _RemoteMethod:
    def __init__(self, handle: InProcessHandleDouble, name: str) -> None:
        self._handle = handle
        self._name = name

    def remote(self, *args: object) -> asyncio.Future[object]:
        self._handle.calls[self._name] += 1
        if self._handle.down:
            raise ConnectionError("actor unavailable (double)")
        method = getattr(self._handle._target, self._name)

        async def call() -> object:
            result = method(*args)
            return await result if inspect.isawaitable(result) else result

        # A fresh context, as in another process: nothing of the caller's (trace context included) leaks across.
        return asyncio.get_running_loop().create_task(call(), context=contextvars.Context())


class PlacementProbeDouble:
    """Stands in for the engine deployment in placement tests: it takes the engine's exact Serve options (resources,
    placement-group bundles and strategy, label selectors) but loads no model; it only says where it landed."""

    def __init__(self, spec: object) -> None:
        self._spec = spec

    async def where(self) -> dict[str, object]:
        import ray

        context = ray.get_runtime_context()
        return {"node_id": context.get_node_id(), "gpu_ids": context.get_accelerator_ids().get("GPU", [])}


class ScriptedOutputEngineDouble:
    """vLLM's engine client, whose answer says a given text while ``script`` is set: the real engine runs each
    request (it is tokenized, admitted, metered and finished as any), and its final output's text and token ids
    become the script's. For what vLLM's serving layer makes of model output that random weights never write (a
    tool call under ``tool_choice: auto``); only for requests that ask for the final output alone (not streamed).
    While ``failure`` is set, each request fails with it, as ``AsyncLLM.generate`` fails when its engine does:
    before any output, or after ``failure_after`` of them (mid-stream). While ``hold`` is set and not yet set off,
    each request runs in the engine but its first output is held back until then (a long prefill, seen from the
    serving layer); ``held`` counts the requests waiting so."""

    def __init__(self, engine: Any, encode: Callable[[str], list[int]]) -> None:
        self._engine = engine
        self._encode = encode
        self.script: str | None = None
        self.failure: Exception | None = None  # while set, every request fails with it
        self.failure_after = 0  # outputs each request yields before it fails (or fewer, if it would finish first)
        self.produced = 0  # output tokens the last request that failed had yielded
        self.hold: asyncio.Event | None = None
        self.held = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def generate(self, prompt: Any, sampling_params: Any, request_id: str, **kwargs: Any) -> AsyncGenerator[Any]:
        script, failure, failure_after = self.script, self.failure, self.failure_after
        if failure is not None and failure_after == 0:
            raise failure
        yielded = tokens = 0
        outputs = self._engine.generate(prompt, sampling_params, request_id, **kwargs)
        async with contextlib.aclosing(outputs):  # closing it aborts the engine request, as a failed engine's is
            async for output in outputs:
                if yielded == 0 and self.hold is not None:  # the engine has the prompt: its prefill is done
                    self.held += 1
                    try:
                        await self.hold.wait()
                    finally:
                        self.held -= 1
                if failure is not None and (yielded == failure_after or output.finished):
                    self.produced = tokens
                    raise failure
                yielded += 1
                tokens += sum(len(c.token_ids) for c in output.outputs)
                if output.finished and script is not None:
                    ids = self._encode(script)
                    output.outputs = [
                        dataclasses.replace(c, text=script, token_ids=ids, finish_reason="stop", stop_reason=None)
                        for c in output.outputs
                    ]
                yield output


class HangingEngineDouble:
    """vLLM's engine client as a hung engine looks from above: each request runs on the real engine, but after
    ``outputs`` of its outputs none reaches the caller any more, while the engine request goes on (and once it has
    finished, its caller still waits, for ever). Ended from outside while the engine works on it (cancelled, as the
    meter ends a request whose engine is late, or closed, as vLLM's serving layer ends one its client left), the
    real engine request, whose output it was awaiting, is aborted (``AsyncLLM.generate`` aborts a request whose
    generator is cancelled or closed), and ``aborted`` records it. ``produced``: the output tokens it let through."""

    def __init__(self, engine: Any, outputs: int) -> None:
        self._engine = engine
        self.outputs = outputs
        self.aborted: list[str] = []
        self.produced = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def generate(self, prompt: Any, sampling_params: Any, request_id: str, **kwargs: Any) -> AsyncGenerator[Any]:
        passed = 0
        try:
            async with contextlib.aclosing(self._engine.generate(prompt, sampling_params, request_id, **kwargs)) as out:
                async for output in out:
                    if passed == self.outputs:
                        continue  # the engine works on, and nothing of it reaches the caller
                    passed += 1
                    self.produced += sum(len(choice.token_ids) for choice in output.outputs)
                    yield output
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted.append(request_id)
            raise
        await asyncio.get_running_loop().create_future()  # the engine has finished; its caller waits for ever


class InstantOutputEngineDouble:
    """vLLM's engine client whose ``generate`` answers at once, without the engine: for the control-plane
    benchmark, which measures everything but generation. Everything else (tokenizer, model config, renderer,
    errors, supported tasks) is the real ``AsyncLLM``'s, so vLLM's serving layer and the meter above it run as
    they do in production. Each request gets ``output_tokens`` made-up tokens in deltas of ``tokens_per_delta``,
    in the request's output kind (DELTA, CUMULATIVE or FINAL_ONLY), and finishes for "length"; its prompt token ids
    are the real tokenized prompt's. ``num_cached_tokens`` is the prompt's whole blocks but the last token, as a
    warm prefix cache would report for a repeated prompt."""

    TOKEN_ID = 0
    TOKEN_TEXT = " x"
    BLOCK = 16

    def __init__(self, engine: Any, output_tokens: int = 16, tokens_per_delta: int = 1) -> None:
        self._engine = engine
        self.output_tokens = output_tokens
        self.tokens_per_delta = max(1, tokens_per_delta)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def _prompt_ids(self, prompt: Any) -> list[int]:
        ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else getattr(prompt, "prompt_token_ids", None)
        if ids is not None:
            return list(ids)
        text = prompt.get("prompt") if isinstance(prompt, dict) else prompt
        if isinstance(text, str):
            return list(self._engine.tokenizer.encode(text))
        raise TypeError(f"{type(self).__name__} cannot read the prompt token ids of {type(prompt).__name__}")

    async def generate(self, prompt: Any, sampling_params: Any, request_id: str, **kwargs: Any) -> AsyncGenerator[Any]:
        from vllm.logprobs import Logprob
        from vllm.outputs import CompletionOutput, RequestOutput
        from vllm.sampling_params import RequestOutputKind

        prompt_ids = self._prompt_ids(prompt)
        # Each made-up token is certain (log-probability 0, rank 1), where the request asks for log-probabilities.
        certain = {self.TOKEN_ID: Logprob(0.0, 1, self.TOKEN_TEXT)}
        wants_logprobs = getattr(sampling_params, "logprobs", None) is not None
        prompt_logprobs = (
            [None] + [{t: Logprob(0.0, 1, None)} for t in prompt_ids[1:]]
            if getattr(sampling_params, "prompt_logprobs", None) is not None
            else None
        )
        cached = max(0, (len(prompt_ids) - 1) // self.BLOCK * self.BLOCK)
        total = self.output_tokens
        if getattr(sampling_params, "max_tokens", None) is not None:
            total = min(total, sampling_params.max_tokens)
        kind = getattr(sampling_params, "output_kind", RequestOutputKind.CUMULATIVE)
        n = getattr(sampling_params, "n", 1) or 1
        done = 0
        while True:
            step = min(self.tokens_per_delta, total - done)
            done += step
            finished = done >= total
            if kind == RequestOutputKind.FINAL_ONLY and not finished:
                continue
            count = step if kind == RequestOutputKind.DELTA else done
            outputs = [
                CompletionOutput(
                    index=i,
                    text=self.TOKEN_TEXT * count,
                    token_ids=[self.TOKEN_ID] * count,
                    cumulative_logprob=0.0 if wants_logprobs else None,
                    logprobs=[certain] * count if wants_logprobs else None,
                    finish_reason="length" if finished else None,
                )
                for i in range(n)
            ]
            yield RequestOutput(
                request_id, None, prompt_ids, prompt_logprobs, outputs, finished, num_cached_tokens=cached
            )
            if finished:
                return
            await asyncio.sleep(0)


INSTANT_OUTPUT_ENGINE_DOUBLE = f"{__name__}.InstantOutputEngineDouble"
