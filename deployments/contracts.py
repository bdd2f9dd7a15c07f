"""The values that cross deployment handles between an engine replica (and the control application) and the billing
actor, and those between the replica's door and its admission.

Small frozen dataclasses, defined once: counts, ids and amounts, never a prompt. No OpenAI wire types and no vLLM
types live here.

Admission happens in the replica, from leases: a slice of a key's rate limits and of its budgets that the billing
actor grants for many requests at once (``LeaseAsk`` -> ``LeaseGrant``), kept alive and given back in batches
(``LeaseUpkeep`` -> ``UpkeepResult``). No request waits for the actor unless its key's slice has run out.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

from deployments.billing.ledger import UsageEvent
from deployments.billing.pricing import TokenPrices
from deployments.keys import KeyRecord, carries_tag, key_id_of, tag_matches


@dataclass(frozen=True)
class Principal:
    """A verified key as a replica caches it (billing's answer to ``authenticate``): the key's settings, whether
    any budget applies to it, and its rate limits in effect (its own, or the defaults)."""

    key: KeyRecord
    has_budget: bool
    rpm: int
    tpm: int


@dataclass(frozen=True)
class KeyCheck:
    """Billing -> the processes that check keys (engine replicas, the control application), so that they refuse a
    made-up key or admin token without asking billing (deployments/keys.py). The tag key (a secret: not in
    ``repr``, a log or a span); the ids of the active keys made before keys carried a tag, a set that only shrinks
    (no such key is made any more); and the SHA-256 digest of the operator's admin token (a secret too), which tells
    the token from any other without giving it away."""

    tag_key: bytes = field(repr=False)
    untagged_ids: frozenset[str]
    admin_digest: bytes = field(repr=False)

    def is_admin_token(self, token: str) -> bool:
        return hmac.compare_digest(hashlib.sha256(token.encode()).digest(), self.admin_digest)

    def may_be_valid(self, key: str) -> bool:
        """Whether ``key`` may be a key billing made: shaped like one, and either with a right tag, or of an older
        shape with the id of a key made before tags. False is final: no look-up can make such a key valid."""
        key_id = key_id_of(key)
        if key_id is None:
            return False
        if carries_tag(key):
            return tag_matches(key, self.tag_key)
        return key_id in self.untagged_ids


@dataclass(frozen=True)
class UsageReport:
    """A replica -> billing after a request ends (completed, failed or cut off): the event, and the budget lease it
    drew its maximum cost from (None: no budget applied)."""

    event: UsageEvent
    lease_id: str | None = None


@dataclass(frozen=True)
class AdmissionRequest:
    """What one HTTP request asks of its key's limits and budgets, before it reaches the engine: counts only."""

    billing_id: str
    key_id: str
    tenant: str
    model: str
    prompt_tokens: int
    max_output_tokens: int  # max_tokens x n, summed over prompts: the most the request can produce
    trace: dict[str, str] = field(default_factory=dict)  # W3C trace context of the caller

    @property
    def tokens(self) -> int:
        """What the request counts against tokens per minute: its prompt and the most it can produce."""
        return self.prompt_tokens + self.max_output_tokens


@dataclass(frozen=True)
class Admission:
    """The request may run: the headers it answers with, the tokens per minute it took (the unused part goes back
    when it ends), and the budget lease it drew its maximum cost from (``None``: no budget applies)."""

    rate_limit_headers: dict[str, str]
    reserved_tokens: int
    lease_id: str | None = None
    reserved_nano_dkk: int = 0  # its maximum cost, drawn from the lease
    fallback: bool = False  # admitted by the replica's own limits while billing was away


@dataclass(frozen=True)
class BudgetAsk:
    """A top-up of a key's budget lease: at least ``need_nano_dkk`` (the request waiting for it), ideally
    ``want_nano_dkk``. ``worst_case_*`` is the waiting request, for a lease that starts with no price known."""

    lease_id: str | None  # the replica's lease of this key, if it holds one
    need_nano_dkk: int
    want_nano_dkk: int
    prompt_tokens: int = 0
    max_output_tokens: int = 0


@dataclass(frozen=True)
class LeaseAsk:
    """A replica -> billing, when a key's slice on the replica has run out: more of its rate limits, of its
    budgets, or both. ``need`` is what the waiting request lacks; ``want`` what would serve the next ones too."""

    model: str
    need_requests: int
    need_tokens: int
    want_requests: int
    want_tokens: int
    budget: BudgetAsk | None = None
    trace: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LimitSnapshot:
    """The key's bucket at the actor when it answered, for the rate-limit headers the replica computes."""

    rpm: int
    tpm: int
    requests_left: float  # in the actor's bucket, after what it granted
    tokens_left: float


@dataclass(frozen=True)
class LeaseGrant:
    """Billing -> a replica: what it granted. A part may be granted while another is refused (``refusal``, an
    ``AnkerError``): what was granted is the replica's to use for later requests."""

    requests: int
    tokens: int
    limits: LimitSnapshot
    lease_id: str | None = None
    lease_nano_dkk: int = 0  # added to the lease now
    lease_ttl_s: float = 0.0  # the lease lapses this long after it was granted or renewed
    prices: TokenPrices | None = None  # the model's prices now: a request's maximum cost, the lease's drawdown
    refusal: Exception | None = None


@dataclass(frozen=True)
class SliceReturn:
    """Rate-limit permits a replica holds for a key and no longer needs."""

    key_id: str
    requests: int
    tokens: int


@dataclass(frozen=True)
class LeaseUpkeep:
    """A replica -> billing, about once a second while it holds anything: leases in use to keep alive, idle ones
    (every usage report of theirs acknowledged) to give back, and idle rate-limit permits."""

    renew: tuple[str, ...] = ()
    release: tuple[str, ...] = ()
    slices: tuple[SliceReturn, ...] = ()


@dataclass(frozen=True)
class UpkeepResult:
    renewed: tuple[str, ...]  # of those asked, the leases still held (an expired one is gone)
    ttl_s: float
