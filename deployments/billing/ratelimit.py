"""Per-key rate limits: requests per minute and tokens per minute as token buckets, with OpenAI's headers.

The buckets live in the billing actor's memory, one per key for every replica; a restart refills them, which errs on
the client's side. Replicas take permits from them in slices (``grant``) and admit requests from their slice, so a
key's limit holds across replicas without a call per request; what a replica no longer needs it gives back. Tokens
are counted at admission as prompt + maximum output, and what a request did not use goes back to its replica's
slice when it ends.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from deployments.errors import RateLimited, TokenRateLimited

WINDOW_S = 60.0
# A grant takes at most this share of what is left in a bucket (but always what the waiting request needs): permits
# held by one replica cannot starve another, and near the limit the slices shrink to one request at a time.
GRANT_SHARE = 0.25


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
        _check(requests, budget, 1, tokens)
        requests.level -= 1
        budget.level -= tokens
        return self._state(requests, budget)

    def grant(
        self,
        key_id: str,
        rpm: int,
        tpm: int,
        need: tuple[int, int],
        want: tuple[int, int],
    ) -> tuple[int, int, LimitState]:
        """A slice of the key's buckets for a replica: at least ``need`` (requests, tokens), at most ``want`` and a
        share of what is left; raises with the wait in ``retry_after_s`` when ``need`` is not there. Returns the
        requests and tokens granted and the buckets after the grant."""
        requests, budget = self._buckets(key_id, rpm, tpm)
        _check(requests, budget, *need)
        granted_requests = _slice(requests.level, need[0], want[0])
        granted_tokens = _slice(budget.level, need[1], want[1])
        requests.level -= granted_requests
        budget.level -= granted_tokens
        return granted_requests, granted_tokens, self._state(requests, budget)

    def levels(self, key_id: str, rpm: int, tpm: int) -> tuple[float, float]:
        """What is left in the key's buckets now: (requests, tokens)."""
        requests, tokens = self._buckets(key_id, rpm, tpm)
        return requests.level, tokens.level

    def give_back(self, key_id: str, requests: int, tokens: int) -> None:
        """Permits a replica took and did not use (its slice went idle)."""
        if tokens > 0:
            self.refund(key_id, tokens)
        bucket = self._requests.get(key_id)
        if bucket is not None and requests > 0:
            bucket.level = min(bucket.capacity, bucket.level + requests)

    def refund(self, key_id: str, tokens: int, request: bool = False) -> None:
        """Gives back tokens taken at admission but not used (the output was shorter than max_tokens), and the
        request itself when it was refused after all (its budget was used up)."""
        bucket = self._tokens.get(key_id)
        if bucket is not None and tokens > 0:
            bucket.level = min(bucket.capacity, bucket.level + tokens)
        requests = self._requests.get(key_id)
        if requests is not None and request:
            requests.level = min(requests.capacity, requests.level + 1)


def _slice(level: float, need: int, want: int) -> int:
    """What a grant takes from a bucket holding ``level``: ``need``, and up to ``want`` within a share of the rest."""
    return max(need, min(want, math.floor(level * GRANT_SHARE)))


def too_large(tpm: int, tokens: int) -> TokenRateLimited:
    """A request that no wait lets through: it may use more tokens than the key's whole minute."""
    return TokenRateLimited(
        f"Request too large: this key's limit is {tpm} tokens per minute, the request may use {tokens} "
        "(prompt + max_tokens). Lower max_tokens or ask your admin for a higher limit.",
        retry_after_s=60,
    )


def _check(requests: _Bucket, tokens: _Bucket, need_requests: int, need_tokens: int) -> None:
    """Raises unless the buckets hold ``need_requests`` and ``need_tokens`` now."""
    if need_tokens > tokens.capacity:
        raise too_large(tokens.capacity, need_tokens)
    wait_requests, wait_tokens = requests.wait_s(need_requests), tokens.wait_s(need_tokens)
    if wait_requests > 0:
        raise RateLimited(
            f"Rate limit reached: {requests.capacity} requests per minute for this key. Please retry after "
            f"{duration(wait_requests)}.",
            retry_after_s=max(1, math.ceil(wait_requests)),
        )
    if wait_tokens > 0:
        raise TokenRateLimited(
            f"Rate limit reached: {tokens.capacity} tokens per minute for this key; the request may use "
            f"{need_tokens}. Please retry after {duration(wait_tokens)}.",
            retry_after_s=max(1, math.ceil(wait_tokens)),
        )
