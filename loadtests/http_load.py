"""A closed-loop HTTP load generator for the OpenAI API: a fixed number of clients, each sending its next request
when its last one has ended, with an async httpx client; every answer is checked, not just its status.

It owns the request bodies, the checks and the latency figures; it knows nothing of Ray or of the ledger.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from testkit.sse import DONE, aiter_events

# A Danish prompt of about a hundred tokens: the chat template and tokenizer do real work, as for a real request.
PROMPT = (
    "Skriv et kort resumé af kommunens nye regler for affaldssortering: madaffald i grøn pose, plast og metal i "
    "samme spand, papir og pap for sig, og farligt affald afleveres på genbrugspladsen. Svar på dansk."
)


@dataclass(frozen=True)
class Answer:
    """What one request gave: tokens and the usage it reported, or why it failed."""

    latency_s: float
    started_s: float
    error: str | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class LoadRun:
    """Every answer of one run; answers that end inside ``window`` are measured (warm-up ones are checked only)."""

    stream: bool
    concurrency: int
    output_tokens: int
    window: tuple[float, float] = (0.0, 0.0)
    answers: list[Answer] = field(default_factory=list)

    @property
    def ok(self) -> list[Answer]:
        return [a for a in self.answers if a.error is None]

    @property
    def measured(self) -> list[Answer]:
        start, end = self.window
        return [a for a in self.answers if start <= a.started_s + a.latency_s <= end]

    @property
    def errors(self) -> Counter[str]:
        return Counter(a.error for a in self.answers if a.error is not None)

    def requests_per_s(self) -> float:
        seconds = self.window[1] - self.window[0]
        return sum(1 for a in self.measured if a.error is None) / seconds if seconds > 0 else 0.0

    def output_tokens_per_s(self) -> float:
        seconds = self.window[1] - self.window[0]
        return sum(a.completion_tokens for a in self.measured if a.error is None) / seconds if seconds > 0 else 0.0

    def latency_ms(self, quantile: float) -> float:
        latencies = sorted(a.latency_s * 1000 for a in self.measured if a.error is None)
        if not latencies:
            return float("nan")
        if len(latencies) == 1:
            return latencies[0]
        return statistics.quantiles(latencies, n=100, method="inclusive")[round(quantile * 100) - 1]


def chat_body(model: str, output_tokens: int, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": output_tokens,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def _usage(usage: dict[str, Any] | None) -> tuple[int, int, int]:
    if not usage:
        return 0, 0, 0
    details = usage.get("prompt_tokens_details") or {}
    return int(usage["completion_tokens"]), int(usage["prompt_tokens"]), int(details.get("cached_tokens") or 0)


def _http_error(response: httpx.Response) -> str:
    """``HTTP 503 engine_unavailable``: the status and the OpenAI error code, never the message."""
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = None
    return f"HTTP {response.status_code}" + (f" {code}" if code else "")


def _token_count_error(body: dict[str, Any], usage: tuple[int, int, int], pieces: int | None) -> str | None:
    """The instant engine double answers exactly ``max_tokens`` tokens, each its one text; a real engine (``pieces``
    None) may stop early, never late."""
    if pieces is None:
        return None if 1 <= usage[0] <= body["max_tokens"] else "wrong token count"
    return None if usage[0] == body["max_tokens"] == pieces else "wrong token count"


async def _non_streaming(
    client: httpx.AsyncClient, body: dict[str, Any], piece: str | None
) -> tuple[str | None, tuple[int, int, int]]:
    response = await client.post("/v1/chat/completions", json=body)
    if response.status_code != 200:
        return _http_error(response), (0, 0, 0)
    answer = response.json()
    text = _text(answer["choices"][0]["message"])
    usage = _usage(answer.get("usage"))
    return _token_count_error(body, usage, text.count(piece) if piece else None), usage


def _text(message: dict[str, Any]) -> str:
    """What a message or delta says, its reasoning included (a reasoning parser may take any of it for thinking)."""
    return "".join(message.get(field) or "" for field in ("reasoning", "reasoning_content", "content"))


async def _streaming(
    client: httpx.AsyncClient, body: dict[str, Any], piece: str | None
) -> tuple[str | None, tuple[int, int, int]]:
    usage: tuple[int, int, int] = (0, 0, 0)
    pieces = 0
    done = False
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return _http_error(response), usage
        async for chunk in aiter_events(response):
            if chunk == DONE:
                done = True
                continue
            if "error" in chunk:
                return f"error event {chunk['error'].get('code')}", usage
            for choice in chunk.get("choices", ()):
                pieces += _text(choice["delta"]).count(piece) if piece else 0
            if chunk.get("usage"):
                usage = _usage(chunk["usage"])
    if not done:
        return "stream without [DONE]", usage
    return _token_count_error(body, usage, pieces if piece else None), usage


async def run_load(
    base_url: str,
    api_key: str,
    model: str,
    *,
    stream: bool,
    concurrency: int,
    output_tokens: int,
    duration_s: float,
    warmup_s: float,
    piece: str | None = None,
    timeout_s: float = 60.0,
) -> LoadRun:
    """``concurrency`` clients send requests for ``warmup_s + duration_s``; the last ``duration_s`` are measured.
    ``piece``: every answer must be exactly ``output_tokens`` of this text long (the engine double's answers)."""
    body = chat_body(model, output_tokens, stream)
    call = _streaming if stream else _non_streaming
    run = LoadRun(stream, concurrency, output_tokens)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {api_key}"}
    started = time.monotonic()
    run.window = (started + warmup_s, started + warmup_s + duration_s)

    async def client_loop(client: httpx.AsyncClient) -> None:
        while time.monotonic() < run.window[1]:
            sent = time.monotonic()
            try:
                error, usage = await call(client, body, piece)
            except httpx.HTTPError as exc:
                error, usage = type(exc).__name__, (0, 0, 0)
            run.answers.append(Answer(time.monotonic() - sent, sent, error, *usage))

    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, limits=limits, timeout=timeout_s, http1=True
    ) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return run
