"""The values that cross deployment handles between an engine replica's door and the billing actor.

Small frozen dataclasses, defined once: counts and ids, never a prompt. No OpenAI wire types and no vLLM types live
here.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class AdmissionRequest:
    """A replica's door -> billing, before a request reaches the engine: counts only, never the prompt."""

    billing_id: str
    key_id: str
    tenant: str
    model: str
    prompt_tokens: int
    max_output_tokens: int  # max_tokens x n, summed over prompts: the most the request can produce
    trace: dict[str, str] = field(default_factory=dict)  # W3C trace context of the caller


@dataclass(frozen=True)
class Admission:
    """Billing -> the door: the request may run. ``reserved_tokens`` goes back with its usage to refund the rest."""

    rate_limit_headers: dict[str, str]
    reserved_tokens: int
    budget_reserved: bool
