"""The benchmark's load client: asyncio + httpx, a fixed number of streaming requests in flight, each timed by
``workloads.StreamTimer`` (TTFT, inter-token gaps, output and cached tokens).

Closed loop: a worker sends its next request when its last one has ended. Replies stay in memory (a conversation
needs them for its next turn) and are never written anywhere.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

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


async def _requests(
    endpoint: Endpoint, requests: Iterator[ChatRequest], concurrency: int, duration_s: float | None
) -> Measured:
    results: list[StreamResult] = []
    started = time.perf_counter()
    deadline = None if duration_s is None else started + duration_s

    async def worker(client: httpx.AsyncClient) -> None:
        # Iterators are shared by the workers: one event loop, no await between the check and next().
        while deadline is None or time.perf_counter() < deadline:
            request = next(requests, None)
            if request is None:
                return
            result = await send(client, endpoint, request)
            result.text = ""  # measured, not kept
            results.append(result)

    async with _client(endpoint, concurrency) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return Measured(results, time.perf_counter() - started)


async def _conversations(
    endpoint: Endpoint, conversations: Iterator[Conversation], concurrency: int, duration_s: float | None
) -> Measured:
    results: list[StreamResult] = []
    started = time.perf_counter()
    deadline = None if duration_s is None else started + duration_s

    async def worker(client: httpx.AsyncClient) -> None:
        while deadline is None or time.perf_counter() < deadline:
            conversation = next(conversations, None)
            if conversation is None:
                return
            while not conversation.done:
                result = await send(client, endpoint, conversation.next_request())
                results.append(result)
                if result.error is not None:
                    break  # the next turn would need this one's reply
                conversation.add_reply(result.text)
                result.text = ""

    async with _client(endpoint, concurrency) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return Measured(results, time.perf_counter() - started)


def run_requests(
    endpoint: Endpoint, requests: Iterator[ChatRequest], concurrency: int, duration_s: float | None = None
) -> Measured:
    """Sends ``requests`` with ``concurrency`` in flight until they run out (or ``duration_s`` has passed)."""
    return asyncio.run(_requests(endpoint, requests, concurrency, duration_s))


def run_conversations(
    endpoint: Endpoint, conversations: Iterator[Conversation], concurrency: int, duration_s: float | None = None
) -> Measured:
    """``concurrency`` conversations at a time, each turn after the previous answer, until they run out."""
    return asyncio.run(_conversations(endpoint, conversations, concurrency, duration_s))
