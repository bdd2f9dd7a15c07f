"""Streaming clients for the stack's back-pressure and fault tests: what each request's client saw, and the
ledger's view of the same key, so that a test can check that the usage billed equals the usage the clients saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from testkit.sse import DONE, aiter_events

# The local profile's prices in nano-DKK per token (6.00 / 3.00 / 45.00 DKK per 1M tokens).
UNCACHED_NANO, CACHED_NANO, OUTPUT_NANO = 6000, 3000, 45000
CLIENT_TIMEOUT_S = 180
# How long the ledger must keep matching what clients were told: longer than a usage outbox's longest wait between
# two sends (deployments/usage_outbox.py, max_backoff_s 5 s) and its flush interval.
LEDGER_HOLD_S = 12


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
    chunk_times: list[float] = field(default_factory=list)  # time.monotonic() as each of those chunks arrived
    answer_id: str | None = None  # the stream's ``id``: its ledger row's
    transport_error: str | None = None  # the connection failed after the response had started
    started_s: float = 0.0  # time.monotonic() when the request was sent
    ended_s: float = 0.0  # ... and when its answer ended
    answered_by: str = ""  # the answer's content type, server and request id, for a failure message

    @property
    def clean(self) -> bool:
        """An answer a client can act on: a finished stream, or an error in OpenAI's shape that is no 500 (a fault
        is never the client's to guess at), and a refusal to retry (429, 503, 504) says when, in Retry-After."""
        if self.status == 200:
            return self.done and self.transport_error is None
        if not isinstance(self.status, int) or self.error_code is None or self.status == 500:
            return False
        return self.status not in (429, 503, 504) or self.retry_after is not None

    @property
    def cut_off(self) -> bool:
        return self.status == 200 and self.error_code is not None

    def summary(self, since_s: float) -> str:
        """A short account of it, with times relative to ``since_s``, for a failure message."""
        told = self.error_code or ("[DONE]" if self.done else "no [DONE]")
        return (
            f"{self.status} {told} {self.content_chunks} chunks, "
            f"{self.started_s - since_s:+.2f}..{self.ended_s - since_s:+.2f} s"
        )


def during(outcomes: list[Outcome], since_s: float, until_s: float) -> list[str]:
    """Accounts of the requests that were open at some time between ``since_s`` and ``until_s``
    (time.monotonic()), with their times relative to ``until_s``: what a failure message shows of a window."""
    return [o.summary(until_s) for o in outcomes if o.started_s <= until_s and o.ended_s >= since_s]


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
    client: httpx.AsyncClient,
    base_url: str,
    key: str,
    model: str,
    content: str,
    max_tokens: int,
    receiving: Callable[[int], None] = lambda change: None,
    temperature: float | None = None,
) -> Outcome:
    """One streaming chat request, as its client saw it. ``receiving(+1)`` is called when the first choice arrives
    and ``receiving(-1)`` when that stream ends, so that a caller can tell how many streams are delivering now."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if temperature is not None:
        body["temperature"] = temperature
    started = time.monotonic()
    try:
        async with client.stream(
            "POST", f"{base_url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as r:
            answered_by = " ".join(r.headers.get(h, "-") for h in ("content-type", "server", "x-request-id"))
            if r.status_code != 200:
                await r.aread()
                times = {"started_s": started, "ended_s": time.monotonic(), "answered_by": answered_by}
                try:
                    error = r.json()["error"]
                except (ValueError, KeyError, TypeError):
                    return Outcome(r.status_code, retry_after=r.headers.get("retry-after"), **times)
                return Outcome(r.status_code, error["code"], error["type"], r.headers.get("retry-after"), **times)
            usage, error, done, chunks, broken = None, None, False, 0, None
            chunk_times: list[float] = []
            answer_id = None
            try:
                async for event in aiter_events(r):
                    if event == DONE:
                        done = True
                    elif "error" in event:
                        error = event["error"]
                    elif event.get("usage"):
                        usage = event["usage"]
                    elif event.get("choices"):
                        chunks += 1
                        chunk_times.append(time.monotonic())
                        answer_id = event.get("id")
                        if chunks == 1:
                            receiving(+1)
            except httpx.HTTPError as exc:
                broken = type(exc).__name__
            finally:
                if chunks:
                    receiving(-1)
            return Outcome(
                200,
                error["code"] if error else None,
                error["type"] if error else None,
                usage=usage,
                done=done,
                content_chunks=chunks,
                chunk_times=chunk_times,
                answer_id=answer_id,
                transport_error=broken,
                started_s=started,
                ended_s=time.monotonic(),
                answered_by=answered_by,
            )
    except httpx.HTTPError as exc:
        return Outcome(type(exc).__name__, started_s=started, ended_s=time.monotonic())


class _Load:
    """Clients streaming chat requests until ``stop()``. What they saw is in ``outcomes`` as it happens, and
    ``receiving`` counts the streams delivering right now, so that a test waits for the traffic it needs
    (``wait_for``) instead of sleeping and hoping."""

    def __init__(self, base_url: str, key: str, model: str, temperature: float | None) -> None:
        self.outcomes: list[Outcome] = []
        self.receiving = 0
        self.began_s = time.monotonic()
        self._base_url, self._key, self._model, self._temperature = base_url, key, model, temperature
        self._numbers = itertools.count()
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    def _count(self, change: int) -> None:
        self.receiving += change

    async def _one(self, client: httpx.AsyncClient, who: int, max_tokens: int) -> Outcome:
        # The number first: no two prompts share a first block, so the router spreads them over the replicas.
        content = f"{next(self._numbers)}. Klient {who} spørger: hvad er klokken?"
        outcome = await stream_chat(
            client, self._base_url, self._key, self._model, content, max_tokens, self._count, self._temperature
        )
        self.outcomes.append(outcome)
        return outcome

    def served_since(self, since_s: float) -> int:
        """Requests sent at or after ``since_s`` (time.monotonic()) that were answered with a whole stream."""
        return sum(1 for o in self.outcomes if o.started_s >= since_s and o.status == 200 and o.clean and not o.cut_off)

    async def wait_for(self, condition: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Polls ``condition`` until it holds; fails after ``timeout_s`` saying what was wanted and what was seen."""
        await wait_until(condition, timeout_s, lambda: f"{what}; the clients saw: {self.account()}")

    def account(self) -> str:
        """What the clients saw so far, by kind, for a failure message."""
        kinds = Counter(f"{o.status} {o.error_code or ('ok' if o.clean else 'unclean')}" for o in self.outcomes)
        return f"{dict(kinds)}, {self.receiving} streams delivering now"


class SteadyLoad(_Load):
    """``clients`` concurrent clients, each streaming one request after another (distinct prompts) until
    ``stop()``; a client that was refused waits as Retry-After says (at most 2 s) and goes on."""

    def __init__(
        self, base_url: str, key: str, model: str, clients: int, max_tokens: int = 48, pause_s: float = 0.2
    ) -> None:
        super().__init__(base_url, key, model, None)
        self._clients, self._max_tokens, self._pause_s = clients, max_tokens, pause_s

    async def run(self) -> list[Outcome]:
        async def client_loop(client: httpx.AsyncClient, who: int) -> None:
            while not self._stop.is_set():
                outcome = await self._one(client, who, self._max_tokens)
                wait_s = float(outcome.retry_after or self._pause_s) if outcome.status != 200 else self._pause_s
                await asyncio.sleep(min(wait_s, 2.0))

        async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S) as client:
            await asyncio.gather(*(client_loop(client, who) for who in range(self._clients)))
        return self.outcomes


class StaggeredStreams(_Load):
    """A new stream every ``every_s`` seconds, whether or not the earlier ones have ended (at most ``at_most`` at
    once), until ``stop()``.

    Clients that wait for their answers fall into step when the answers arrive in bursts: they all end at once
    and, for a moment, none is running. Streams started at their own times do not: while each takes longer than
    ``every_s`` to generate, some stream is running at any moment, whenever a drain or a stop begins."""

    def __init__(
        self,
        base_url: str,
        key: str,
        model: str,
        max_tokens: int,
        every_s: float = 1.0,
        at_most: int = 6,
        temperature: float | None = None,
    ) -> None:
        super().__init__(base_url, key, model, temperature)
        self._max_tokens, self._every_s, self._at_most = max_tokens, every_s, at_most

    async def run(self) -> list[Outcome]:
        slots = asyncio.Semaphore(self._at_most)

        async def stream(client: httpx.AsyncClient, who: int) -> None:
            try:
                await self._one(client, who, self._max_tokens)
            finally:
                slots.release()

        async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S) as client:
            running: set[asyncio.Task[None]] = set()
            for who in itertools.count():
                await slots.acquire()
                if self._stop.is_set():
                    break
                task = asyncio.create_task(stream(client, who))
                running.add(task)
                task.add_done_callback(running.discard)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self._every_s)
                if self._stop.is_set():
                    break
            await asyncio.gather(*running)
        return self.outcomes


async def wait_until(
    condition: Callable[[], bool], timeout_s: float, seen: Callable[[], str], period_s: float = 0.1
) -> float:
    """Polls ``condition`` until it holds and returns how long that took; after ``timeout_s``, fails with
    ``seen()``: what the system showed instead. The condition runs in a thread: it may block (asking Serve, reading
    files) without stalling the clients on this loop."""
    started = time.monotonic()
    while not await asyncio.to_thread(condition):
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"not within {timeout_s:g} s: {seen()}")
        await asyncio.sleep(period_s)
    return time.monotonic() - started


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
    besides: tuple[int, int] = (0, 0),
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(billed, seen) as (output tokens, nano-DKK) since ``before``, once billed is seen plus at most ``allowance``
    and has stayed so for ``LEDGER_HOLD_S``, or ``timeout_s`` passed (usage reaches the ledger asynchronously, and
    after a fault possibly only once the ledger is back). The hold outlasts an outbox's longest wait between two
    sends, so a report that arrives after the sums first matched (one billed twice, say) is seen. The allowance is
    for requests whose client got no answer at all: the server bills what it produced for them, which no client
    was told; ``besides`` is billed on top of what they were told (as the test has checked it on its own)."""
    told = seen(outcomes)
    expected = (told[0] + besides[0], told[1] + besides[1])
    deadline = time.monotonic() + timeout_s
    matched_since: float | None = None
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
        if not within:
            matched_since = None
        elif matched_since is None:
            matched_since = time.monotonic()
        if (matched_since is not None and time.monotonic() - matched_since >= LEDGER_HOLD_S) or (
            time.monotonic() > deadline
        ):
            return billed, told
        time.sleep(2)
