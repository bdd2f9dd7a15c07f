"""The benchmark's load client: asyncio + httpx, a fixed number of streaming requests in flight, each timed by
``workloads.StreamTimer`` (TTFT, inter-token gaps, output and cached tokens).

Closed loop: a worker sends its next request when its last one has ended. Replies stay in memory (a conversation
needs them for its next turn) and are never written anywhere.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import httpx

from loadtests.bench_targets import Endpoint
from loadtests.workloads import ChatRequest, Conversation, StreamResult, StreamTimer

REQUEST_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Measured:
    """The results of one measured run and how long it took (first request sent to last answer in)."""

    results: list[StreamResult]
    wall_s: float


def _error_code(status: int, body: bytes) -> str:
    try:
        error = json.loads(body).get("error") or {}
        return str(error.get("code") or error.get("type") or status)
    except (ValueError, AttributeError):
        return str(status)


async def send(client: httpx.AsyncClient, endpoint: Endpoint, request: ChatRequest) -> StreamResult:
    """One streamed chat completion, timed from just before it is sent."""
    timer = StreamTimer(time.perf_counter())
    try:
        async with client.stream("POST", "/v1/chat/completions", json=request.body(endpoint.model)) as response:
            if response.status_code != 200:
                return timer.failed(_error_code(response.status_code, await response.aread()), time.perf_counter())
            async for data in response.aiter_raw():
                timer.feed(data, time.perf_counter())
    except httpx.HTTPError as exc:
        return timer.failed(type(exc).__name__, time.perf_counter())
    return timer.result(time.perf_counter())


def _client(endpoint: Endpoint, concurrency: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=endpoint.base_url,
        headers=endpoint.headers,
        timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=30.0),
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
    )


T = TypeVar("T")


async def _closed_loop(
    endpoint: Endpoint,
    items: Iterator[T],
    concurrency: int,
    duration_s: float | None,
    run: Callable[[httpx.AsyncClient, T, list[StreamResult]], Awaitable[None]],
) -> Measured:
    """``concurrency`` workers, each taking the next item when its last one is done, until the items run out (or
    ``duration_s`` has passed); ``run`` sends one item and appends its results."""
    results: list[StreamResult] = []
    started = time.perf_counter()
    deadline = None if duration_s is None else started + duration_s

    async def worker(client: httpx.AsyncClient) -> None:
        # Iterators are shared by the workers: one event loop, no await between the check and next().
        while deadline is None or time.perf_counter() < deadline:
            item = next(items, None)
            if item is None:
                return
            await run(client, item, results)

    async with _client(endpoint, concurrency) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return Measured(results, time.perf_counter() - started)


def run_requests(
    endpoint: Endpoint, requests: Iterator[ChatRequest], concurrency: int, duration_s: float | None = None
) -> Measured:
    """Sends ``requests`` with ``concurrency`` in flight until they run out (or ``duration_s`` has passed)."""

    async def one(client: httpx.AsyncClient, request: ChatRequest, results: list[StreamResult]) -> None:
        result = await send(client, endpoint, request)
        result.text = ""  # measured, not kept
        results.append(result)

    return asyncio.run(_closed_loop(endpoint, requests, concurrency, duration_s, one))


def run_conversations(
    endpoint: Endpoint, conversations: Iterator[Conversation], concurrency: int, duration_s: float | None = None
) -> Measured:
    """``concurrency`` conversations at a time, each turn after the previous answer, until they run out."""

    async def one(client: httpx.AsyncClient, conversation: Conversation, results: list[StreamResult]) -> None:
        while not conversation.done:
            result = await send(client, endpoint, conversation.next_request())
            results.append(result)
            if result.error is not None:
                break  # the next turn would need this one's reply
            conversation.add_reply(result.text)
            result.text = ""

    return asyncio.run(_closed_loop(endpoint, conversations, concurrency, duration_s, one))
