"""OpenAI wire shapes for responses: chat completions, text completions, their stream chunks, usage and logprobs.

Builds plain dicts from the contract's ``Delta`` values; it does no I/O and keeps nothing after the request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from deployments.contracts import Delta, TokenLogprob


@dataclass
class Usage:
    """Token counts of one request; ``cached_tokens`` is the part of ``prompt_tokens`` served from the prefix cache."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }


@dataclass
class Choice:
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


class Accumulator:
    """Collects deltas per choice (and cached tokens per prompt) into a final response and its usage."""

    def __init__(self, prompt_tokens: list[int], n: int) -> None:
        self._prompt_tokens = prompt_tokens
        self._cached = [0] * len(prompt_tokens)
        self.n = n
        self.choices = [Choice() for _ in range(len(prompt_tokens) * n)]

    def choice_index(self, prompt_index: int, delta: Delta) -> int:
        return prompt_index * self.n + delta.index

    def add(self, prompt_index: int, delta: Delta) -> int:
        index = self.choice_index(prompt_index, delta)
        choice = self.choices[index]
        choice.text.append(delta.text)
        choice.tokens += len(delta.token_ids)
        if delta.finish_reason is not None:
            choice.finish_reason = delta.finish_reason
        if delta.logprobs:
            choice.logprobs.extend(delta.logprobs)
        self._cached[prompt_index] = max(self._cached[prompt_index], delta.num_cached_tokens)
        return index

    @property
    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=sum(self._prompt_tokens),
            cached_tokens=sum(self._cached),
            completion_tokens=sum(c.tokens for c in self.choices),
        )


def _top(lp: TokenLogprob) -> list[dict[str, Any]]:
    return [{"token": t.token, "logprob": t.logprob, "bytes": list(t.token_bytes)} for t in lp.top]


def chat_logprobs(logprobs: list[TokenLogprob] | tuple[TokenLogprob, ...] | None) -> dict[str, Any] | None:
    if logprobs is None:
        return None
    return {
        "content": [
            {"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token_bytes), "top_logprobs": _top(lp)}
            for lp in logprobs
        ],
        "refusal": None,
    }


def completion_logprobs(
    logprobs: list[TokenLogprob] | tuple[TokenLogprob, ...] | None, text_offset: int = 0
) -> dict[str, Any] | None:
    if logprobs is None:
        return None
    offsets = []
    for lp in logprobs:
        offsets.append(text_offset)
        text_offset += len(lp.token)
    return {
        "tokens": [lp.token for lp in logprobs],
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{t.token: t.logprob for t in lp.top} for lp in logprobs],
        "text_offset": offsets,
    }


def chat_completion(request_id: str, created: int, model: str, acc: Accumulator, with_logprobs: bool) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "service_tier": "default",
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": "".join(c.text), "refusal": None, "annotations": []},
                "logprobs": chat_logprobs(c.logprobs) if with_logprobs else None,
                "finish_reason": c.finish_reason or "stop",
            }
            for i, c in enumerate(acc.choices)
        ],
        "usage": acc.usage.as_dict(),
    }


def text_completion(request_id: str, created: int, model: str, acc: Accumulator, with_logprobs: bool) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": i,
                "text": "".join(c.text),
                "logprobs": completion_logprobs(c.logprobs) if with_logprobs else None,
                "finish_reason": c.finish_reason or "stop",
            }
            for i, c in enumerate(acc.choices)
        ],
        "usage": acc.usage.as_dict(),
    }


@dataclass(frozen=True)
class ChunkHeader:
    request_id: str
    created: int
    model: str
    include_usage: bool


def chat_chunk(header: ChunkHeader, choices: list[dict[str, Any]]) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": header.request_id,
        "object": "chat.completion.chunk",
        "created": header.created,
        "model": header.model,
        "system_fingerprint": None,
        "service_tier": "default",
        "choices": choices,
    }
    if header.include_usage:
        chunk["usage"] = None
    return chunk


def chat_delta_choice(index: int, delta: Delta | None, role: bool, with_logprobs: bool) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if role:
        body["role"] = "assistant"
    body["content"] = delta.text if delta is not None else ""
    return {
        "index": index,
        "delta": body,
        "logprobs": chat_logprobs(delta.logprobs) if with_logprobs and delta is not None else None,
        "finish_reason": delta.finish_reason if delta is not None else None,
    }


def completion_chunk(header: ChunkHeader, choices: list[dict[str, Any]]) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": header.request_id,
        "object": "text_completion",
        "created": header.created,
        "model": header.model,
        "system_fingerprint": None,
        "choices": choices,
    }
    if header.include_usage:
        chunk["usage"] = None
    return chunk


def completion_delta_choice(index: int, delta: Delta, with_logprobs: bool, text_offset: int) -> dict[str, Any]:
    return {
        "index": index,
        "text": delta.text,
        "logprobs": completion_logprobs(delta.logprobs, text_offset) if with_logprobs else None,
        "finish_reason": delta.finish_reason,
    }


def usage_chunk(chunk: dict[str, Any], usage: Usage) -> dict[str, Any]:
    return {**chunk, "choices": [], "usage": usage.as_dict()}
