"""Streaming clients for the stack's back-pressure and fault tests: what each request's client saw, and the
ledger's view of the same key, so that a test can check that the usage billed equals the usage the clients saw.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass
from typing import Any

import httpx

# The local profile's prices in nano-DKK per token (6.00 / 3.00 / 45.00 DKK per 1M tokens).
UNCACHED_NANO, CACHED_NANO, OUTPUT_NANO = 6000, 3000, 45000
CLIENT_TIMEOUT_S = 180


@dataclass(frozen=True)
class Outcome:
    """One request as its client saw it; ``status`` is the HTTP status or the name of a transport error."""

    status: int | str
    error_code: str | None = None
    error_type: str | None = None
    retry_after: str | None = None
    usage: dict[str, Any] | None = None
    done: bool = False  # the stream ended with `data: [DONE]`
    content_chunks: int = 0
    transport_error: str | None = None  # the connection failed after the response had started

    @property
    def clean(self) -> bool:
        """An answer a client can act on: a finished stream, or an HTTP error in OpenAI's shape."""
        if self.status == 200:
            return self.done and self.transport_error is None
        return isinstance(self.status, int) and self.error_code is not None

    @property
    def cut_off(self) -> bool:
        return self.status == 200 and self.error_code is not None


def cost_nano(usage: dict[str, Any] | None) -> int:
    """What a usage chunk costs: a stream that ended before any output costs nothing (the ledger's rule)."""
    if not usage or not usage["completion_tokens"]:
        return 0
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    return (
        (usage["prompt_tokens"] - cached) * UNCACHED_NANO
        + cached * CACHED_NANO
        + usage["completion_tokens"] * OUTPUT_NANO
    )


def seen(outcomes: list[Outcome]) -> tuple[int, int]:
    """(output tokens, nano-DKK) over the usage the clients were told."""
    return (
        sum(o.usage["completion_tokens"] for o in outcomes if o.usage),
        sum(cost_nano(o.usage) for o in outcomes),
    )


async def stream_chat(
    client: httpx.AsyncClient, base_url: str, key: str, model: str, content: str, max_tokens: int
) -> Outcome:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    try:
        async with client.stream(
            "POST", f"{base_url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as r:
            if r.status_code != 200:
                await r.aread()
                try:
                    error = r.json()["error"]
                except (ValueError, KeyError, TypeError):
                    return Outcome(r.status_code, retry_after=r.headers.get("retry-after"))
                return Outcome(r.status_code, error["code"], error["type"], r.headers.get("retry-after"))
            usage, error, done, chunks, broken = None, None, False, 0, None
            try:
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        continue
                    event = json.loads(line[len("data: ") :])
                    if "error" in event:
                        error = event["error"]
                    elif event.get("usage"):
                        usage = event["usage"]
                    elif event.get("choices"):
                        chunks += 1
            except httpx.HTTPError as exc:
                broken = type(exc).__name__
            return Outcome(
                200,
                error["code"] if error else None,
                error["type"] if error else None,
                usage=usage,
                done=done,
                content_chunks=chunks,
                transport_error=broken,
            )
    except httpx.HTTPError as exc:
        return Outcome(type(exc).__name__)


async def steady_load(
    base_url: str, key: str, model: str, clients: int, stop: asyncio.Event, max_tokens: int = 48, pause_s: float = 0.2
) -> list[Outcome]:
    """``clients`` concurrent clients, each streaming one request after another (distinct prompts) until ``stop``;
    a client that was refused waits as Retry-After says (at most 2 s) and goes on."""
    outcomes: list[Outcome] = []
    numbers = itertools.count()

    async def client_loop(client: httpx.AsyncClient, who: int) -> None:
        while not stop.is_set():
            # The number first: no two prompts share a first block, so the router spreads them over the replicas.
            content = f"{next(numbers)}. Klient {who} spørger: hvad er klokken?"
            outcome = await stream_chat(client, base_url, key, model, content, max_tokens)
            outcomes.append(outcome)
            wait_s = float(outcome.retry_after or pause_s) if outcome.status != 200 else pause_s
            await asyncio.sleep(min(wait_s, 2.0))

    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S) as client:
        await asyncio.gather(*(client_loop(client, who) for who in range(clients)))
    return outcomes


def ledger_totals(base_url: str, key: str) -> dict[str, Any]:
    r = httpx.get(f"{base_url}/v1/usage", headers={"Authorization": f"Bearer {key}"}, timeout=60)
    assert r.status_code == 200, r.text
    totals: dict[str, Any] = r.json()["totals"]
    return totals


def wait_for_ledger(
    base_url: str,
    key: str,
    before: dict[str, Any],
    outcomes: list[Outcome],
    timeout_s: float = 180,
    allowance: tuple[int, int] = (0, 0),
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(billed, seen) as (output tokens, nano-DKK) since ``before``, once billed is seen plus at most ``allowance``
    or ``timeout_s`` passed (usage reaches the ledger asynchronously, and after a fault possibly only once the ledger
    is back). The allowance is for requests whose client got no answer at all: the server bills what it produced
    for them, which no client was told."""
    expected = seen(outcomes)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            now = ledger_totals(base_url, key)
            billed = (
                now["output_tokens"] - before["output_tokens"],
                now["cost_nano_dkk"] - before["cost_nano_dkk"],
            )
        except (AssertionError, httpx.HTTPError):
            billed = (-1, -1)
        within = all(e <= b <= e + a for b, e, a in zip(billed, expected, allowance, strict=True))
        if within or time.monotonic() > deadline:
            return billed, expected
        time.sleep(2)
