"""Per-key rate limits: requests per minute and tokens per minute as token buckets, with OpenAI's headers.

In memory in the billing actor (one place for all ingress replicas); a restart refills every bucket, which errs on
the client's side. Tokens are counted at admission as prompt + maximum output and refunded to actual use at the end.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from deployments.errors import RateLimited, TokenRateLimited

WINDOW_S = 60.0


def duration(seconds: float) -> str:
    """OpenAI's reset format: ``20ms``, ``1s``, ``6m0s``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    return f"{whole // 60}m{whole % 60}s" if whole >= 60 else f"{whole}s"


@dataclass
class _Bucket:
    capacity: int
    level: float
    updated: float

    def refill(self, capacity: int, now: float) -> None:
        if capacity != self.capacity:  # the limit changed: keep what was used, within the new capacity
            self.level = min(capacity, self.level + capacity - self.capacity)
            self.capacity = capacity
        self.level = min(self.capacity, self.level + (now - self.updated) * self.capacity / WINDOW_S)
        self.updated = now

    def wait_s(self, amount: int) -> float:
        return 0.0 if self.level >= amount else (amount - self.level) * WINDOW_S / self.capacity

    def reset_s(self) -> float:
        return (self.capacity - self.level) * WINDOW_S / self.capacity


@dataclass(frozen=True)
class LimitState:
    limit_requests: int
    remaining_requests: int
    reset_requests_s: float
    limit_tokens: int
    remaining_tokens: int
    reset_tokens_s: float

    def headers(self) -> dict[str, str]:
        return {
            "x-ratelimit-limit-requests": str(self.limit_requests),
            "x-ratelimit-remaining-requests": str(self.remaining_requests),
            "x-ratelimit-reset-requests": duration(self.reset_requests_s),
            "x-ratelimit-limit-tokens": str(self.limit_tokens),
            "x-ratelimit-remaining-tokens": str(self.remaining_tokens),
            "x-ratelimit-reset-tokens": duration(self.reset_tokens_s),
        }


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._requests: dict[str, _Bucket] = {}
        self._tokens: dict[str, _Bucket] = {}

    def _buckets(self, key_id: str, rpm: int, tpm: int) -> tuple[_Bucket, _Bucket]:
        now = self._clock()
        requests = self._requests.setdefault(key_id, _Bucket(rpm, float(rpm), now))
        tokens = self._tokens.setdefault(key_id, _Bucket(tpm, float(tpm), now))
        requests.refill(rpm, now)
        tokens.refill(tpm, now)
        return requests, tokens

    def _state(self, requests: _Bucket, tokens: _Bucket) -> LimitState:
        return LimitState(
            requests.capacity,
            max(0, math.floor(requests.level)),
            requests.reset_s(),
            tokens.capacity,
            max(0, math.floor(tokens.level)),
            tokens.reset_s(),
        )

    def peek(self, key_id: str, rpm: int, tpm: int) -> LimitState:
        return self._state(*self._buckets(key_id, rpm, tpm))

    def admit(self, key_id: str, rpm: int, tpm: int, tokens: int) -> LimitState:
        """Takes one request and ``tokens`` from the key's buckets, or raises with the wait in ``retry_after_s``."""
        requests, budget = self._buckets(key_id, rpm, tpm)
        if tokens > tpm:
            raise TokenRateLimited(
                f"Request too large: this key's limit is {tpm} tokens per minute, the request may use {tokens} "
                "(prompt + max_tokens). Lower max_tokens or ask your admin for a higher limit.",
                retry_after_s=60,
            )
        wait_requests, wait_tokens = requests.wait_s(1), budget.wait_s(tokens)
        if wait_requests > 0:
            raise RateLimited(
                f"Rate limit reached: {rpm} requests per minute for this key. Please retry after "
                f"{duration(wait_requests)}.",
                retry_after_s=max(1, math.ceil(wait_requests)),
            )
        if wait_tokens > 0:
            raise TokenRateLimited(
                f"Rate limit reached: {tpm} tokens per minute for this key; the request may use {tokens}. "
                f"Please retry after {duration(wait_tokens)}.",
                retry_after_s=max(1, math.ceil(wait_tokens)),
            )
        requests.level -= 1
        budget.level -= tokens
        return self._state(requests, budget)

    def refund(self, key_id: str, tokens: int, request: bool = False) -> None:
        """Gives back tokens taken at admission but not used (the output was shorter than max_tokens), and the
        request itself when it was refused after all (its budget was used up)."""
        bucket = self._tokens.get(key_id)
        if bucket is not None and tokens > 0:
            bucket.level = min(bucket.capacity, bucket.level + tokens)
        requests = self._requests.get(key_id)
        if requests is not None and request:
            requests.level = min(requests.capacity, requests.level + 1)
