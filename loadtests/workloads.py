"""Synthetic chat workloads and the timing of one streamed chat completion, shared by Locust and the benchmark.

Plain Python (no Locust, no gevent, no HTTP client); the text is generated from word lists, never real data.
Every request is deterministic given the caller's ``random.Random``:

- ``short_chat(rng)``: a short user question.
- ``shared_prefix(rng)``: ``SHARED_SYSTEM_PROMPT`` (about 670 tokens of the tiny models' tokenizer, identical for
  every request and process, so its prefix blocks are cached) and a short question.
- ``Conversation(rng)``: a system prompt and 4-6 user turns; ``next_request()`` gives the next turn with everything
  said so far, ``add_reply(text)`` adds the assistant's answer, ``done`` says when the turns are used up.

Each gives a ``ChatRequest``; ``ChatRequest.body(model)`` is the JSON for ``POST /v1/chat/completions`` with
``stream: true`` and ``stream_options.include_usage``. To time a response, create a ``StreamTimer`` just before
sending, ``feed(data, now_s)`` it every received chunk of bytes with ``time.perf_counter()``, and call
``result(now_s)`` at the end of the stream (or ``failed(code, now_s)`` when the request failed before streaming):
the ``StreamResult`` holds TTFT, inter-token gaps, token counts, total time and an OpenAI error code.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from testkit.sse import DONE, SseDecoder

MAX_TOKENS = 32

_NOUNS = (
    "system", "engine", "request", "token", "model", "replica", "cache", "prefix", "budget", "price", "client",
    "server", "queue", "stream", "window", "river", "bridge", "forest", "harbour", "garden", "village", "mill",
    "report", "record", "ledger", "invoice", "policy", "schedule", "network", "station", "library", "market",
    "weather", "morning", "evening", "season", "journey", "lesson", "question", "answer", "number", "letter",
)  # fmt: skip
_VERBS = (
    "runs", "serves", "streams", "stores", "reads", "writes", "scales", "checks", "counts", "measures", "sends",
    "keeps", "builds", "opens", "closes", "moves", "holds", "shows", "follows", "explains", "describes", "needs",
)  # fmt: skip
_ADJECTIVES = (
    "quick", "small", "large", "green", "quiet", "shared", "local", "daily", "simple", "careful", "open", "old",
    "new", "short", "long", "clear", "exact", "early", "late", "busy", "calm", "bright", "steady", "public",
)  # fmt: skip
_ADVERBS = ("briefly", "precisely", "slowly", "quickly", "often", "rarely", "always", "together", "again", "today")
_QUESTION_STARTS = (
    "What is the", "How does the", "Why would the", "When should the", "Where can the", "Which part of the",
    "How many times does the", "Can you explain how the", "What happens when the",
)  # fmt: skip


@dataclass(frozen=True)
class ChatRequest:
    """One chat completion to send: OpenAI ``messages`` and the output limit."""

    messages: list[dict[str, str]]
    max_tokens: int = MAX_TOKENS

    def body(self, model: str) -> dict[str, Any]:
        """The streaming request body, asking for usage in the last chunk."""
        return {
            "model": model,
            "messages": self.messages,
            "max_tokens": self.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }


def _sentence(rng: random.Random) -> str:
    words = [
        "The",
        rng.choice(_ADJECTIVES),
        rng.choice(_NOUNS),
        rng.choice(_VERBS),
        "the",
        rng.choice(_NOUNS),
        rng.choice(_ADVERBS),
        "and",
        rng.choice(_VERBS),
        "a",
        rng.choice(_ADJECTIVES),
        rng.choice(_NOUNS),
    ]
    return " ".join(words) + "."


def _question(rng: random.Random) -> str:
    return (
        f"{rng.choice(_QUESTION_STARTS)} {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)[:-1]} "
        f"the {rng.choice(_NOUNS)} {rng.choice(_ADVERBS)}? Please answer {rng.choice(_ADVERBS)}."
    )


def _document(rng: random.Random, number: int, sentences: int) -> str:
    return f"Document {number}: " + " ".join(_sentence(rng) for _ in range(sentences))


def _shared_system_prompt() -> str:
    rng = random.Random(20261124)  # fixed: every process and every run sends the same prefix
    documents = "\n\n".join(_document(rng, number, 5) for number in range(1, 5))
    return f"You are a helpful assistant. Answer briefly from these documents only.\n\n{documents}"


SHARED_SYSTEM_PROMPT = _shared_system_prompt()


def short_chat(rng: random.Random) -> ChatRequest:
    """A short question (about 35 tokens of the tiny models' tokenizer) without a system prompt."""
    return ChatRequest([{"role": "user", "content": _question(rng)}])


def shared_prefix(rng: random.Random) -> ChatRequest:
    """RAG-like: the long shared system prompt, then a short question that varies."""
    return ChatRequest(
        [{"role": "system", "content": SHARED_SYSTEM_PROMPT}, {"role": "user", "content": _question(rng)}]
    )


class Conversation:
    """A multi-turn chat: each request carries the system prompt, every earlier turn and the assistant's replies."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._turns_left = rng.randint(4, 6)
        system = "You are a helpful assistant. " + " ".join(_sentence(rng) for _ in range(2))
        self._messages: list[dict[str, str]] = [{"role": "system", "content": system}]

    @property
    def done(self) -> bool:
        return self._turns_left == 0

    def next_request(self) -> ChatRequest:
        """Adds the next user turn and returns the whole conversation so far; call ``add_reply`` before the next."""
        if self.done:
            raise RuntimeError("the conversation has no turns left")
        if self._messages[-1]["role"] == "user":
            raise RuntimeError("add_reply must follow next_request")
        self._turns_left -= 1
        self._messages.append({"role": "user", "content": _question(self._rng)})
        return ChatRequest(list(self._messages))

    def add_reply(self, text: str) -> None:
        self._messages.append({"role": "assistant", "content": text})


@dataclass
class StreamResult:
    """What one streamed chat completion measured; ``text`` stays in memory only and is never printed."""

    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)  # gaps between successive chunks that carry output
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    total_s: float = 0.0
    error: str | None = None  # an OpenAI error code (or HTTP status) when the request failed
    text: str = field(default="", repr=False)

    @property
    def output_tokens_per_s(self) -> float:
        """Output tokens over the request's whole duration (0 for a failed or empty request)."""
        return self.output_tokens / self.total_s if self.total_s > 0 else 0.0


class StreamTimer:
    """Turns the ``data: {...}`` events of a chat completion stream, fed as raw bytes with their arrival times,
    into a ``StreamResult``. TTFT is the arrival of the first chunk with output (content or reasoning) or a finish
    reason; the text (a conversation's next assistant turn) is that output, reasoning included."""

    def __init__(self, started_s: float) -> None:
        self._started_s = started_s
        self._events = SseDecoder()
        self._last_output_s: float | None = None
        self._done = False
        self._usage = False
        self._result = StreamResult()
        self._text: list[str] = []

    def feed(self, data: bytes, now_s: float) -> None:
        for payload in self._events.feed(data):
            self._event(payload, now_s)

    def _event(self, chunk: Any, now_s: float) -> None:
        if chunk == DONE:
            self._done = True
            return
        if "error" in chunk:
            error = chunk["error"]
            self._result.error = str(error.get("code") or error.get("type") or "error")
            return
        if chunk.get("usage"):
            usage = chunk["usage"]
            self._usage = True
            self._result.output_tokens = int(usage.get("completion_tokens") or 0)
            self._result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self._result.cached_tokens = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            # A token of reasoning is output as much as one of content (vLLM's reasoning parser splits them).
            content = delta.get("content") or delta.get("reasoning") or delta.get("reasoning_content") or ""
            if not content and not choice.get("finish_reason"):
                continue
            self._text.append(content)
            if self._last_output_s is None:
                self._result.ttft_s = now_s - self._started_s
            else:
                self._result.itl_s.append(now_s - self._last_output_s)
            self._last_output_s = now_s

    def failed(self, error: str, now_s: float) -> StreamResult:
        """The result of a request that ended with ``error`` (an OpenAI error code or an HTTP status)."""
        self._result.error = error
        return self.result(now_s)

    def result(self, now_s: float) -> StreamResult:
        """The result once the stream ended; a stream without ``[DONE]`` or without usage is an error."""
        result = self._result
        result.total_s = now_s - self._started_s
        result.text = "".join(self._text)
        if result.error is None and not self._done:
            result.error = "incomplete_stream"
        elif result.error is None and not self._usage:
            result.error = "missing_usage"
        return result
