"""The values that cross deployment handles: ingress -> tokenizer -> engine, and back.

Small frozen dataclasses, defined once. No OpenAI wire types and no vLLM types live here: the ingress speaks OpenAI,
the engine speaks vLLM, and these are what they hand each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str
    name: str | None = None


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters in engine-neutral terms; the engine maps them to its own type.

    The completion budget is per prompt (``Prepared.max_tokens``), resolved by the tokenizer against the context.
    """

    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # None: no logprobs. k >= 0: the sampled token's logprob plus the k most likely alternatives.
    logprobs: int | None = None


@dataclass(frozen=True)
class Prepared:
    """One prompt, tokenized once, ready for the engine; ``max_tokens`` is resolved against the context."""

    model: str
    token_ids: tuple[int, ...]
    block_hashes: tuple[int, ...]
    max_tokens: int
    # Whose prefix cache the prompt may use (one per organisation): vLLM mixes it into its block hashes, so no
    # organisation can hit, or time, another's cached prompts. Set by the ingress (tokenizer.isolated).
    cache_salt: str | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class TopLogprob:
    token: str
    logprob: float
    token_bytes: tuple[int, ...]


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    token_bytes: tuple[int, ...]
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class Delta:
    """New output of one choice since the last delta of that choice."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    num_cached_tokens: int = 0
    finish_reason: str | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True)
class EngineFailure:
    """Yielded by the engine instead of raising: the engine could not (or can no longer) serve the request."""

    reason: str
    retry_after_s: int = 5
    overloaded: bool = False  # every replica and the caller's queue are full: retry, nothing is wrong


@dataclass(frozen=True)
class EngineLoad:
    """What an engine replica reports about its queue (for health, tests and, later, autoscaling)."""

    model: str
    ready: bool
    running: int  # scheduled in vLLM's current batch
    waiting: int  # queued in vLLM's scheduler
    in_flight: int = 0  # accepted by this replica and not finished (running + waiting + being detokenized)
    kv_cache_usage: float = 0.0
    aborted_total: int = 0
    request_ids: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class AdmissionRequest:
    """Ingress -> billing, before a request reaches an engine: counts only, never the prompt."""

    billing_id: str
    key_id: str
    tenant: str
    model: str
    prompt_tokens: int
    max_output_tokens: int  # max_tokens x n, summed over prompts: the most the request can produce
    trace: dict[str, str] = field(default_factory=dict)  # W3C trace context of the caller


@dataclass(frozen=True)
class Admission:
    """Billing -> ingress: the request may run. ``reserved_tokens`` goes back with its usage to refund the rest."""

    rate_limit_headers: dict[str, str]
    reserved_tokens: int
    budget_reserved: bool
