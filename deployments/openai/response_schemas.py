"""Anker's response shapes as pydantic models, for the published OpenAPI document only: errors, the Responses API's
answers in outline, and the model list and usage routes' answers (the chat and completions answers are vLLM's own
response models, ``openapi.py``). The routes build their responses themselves and never validate against these.

Each closed model (no undocumented field) makes the schemathesis run in the test suite fail on any drift between a
response and its description here.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Doc(BaseModel):
    """A response shape, documented closed: a field the server adds without documenting it fails the test suite."""

    model_config = ConfigDict(extra="forbid")


# -- errors ---------------------------------------------------------------------------------------------------------


class ErrorDetail(_Doc):
    message: str
    type: str
    param: str | None = Field(description="The request field the error is about, when there is one.")
    code: str | None


class ErrorResponse(_Doc):
    error: ErrorDetail


# -- the Responses API -----------------------------------------------------------------------------------------------


class _Open(BaseModel):
    """A shape described by the fields clients read, open to the others vLLM's serving layer sends."""

    model_config = ConfigDict(extra="allow")


class ResponseInputTokensDetails(_Open):
    cached_tokens: int = Field(description="Input tokens served from the prefix cache.")


class ResponseOutputTokensDetails(_Open):
    reasoning_tokens: int


class ResponseUsage(_Open):
    input_tokens: int
    input_tokens_details: ResponseInputTokensDetails
    output_tokens: int
    output_tokens_details: ResponseOutputTokensDetails
    total_tokens: int


class ResponseObject(_Open):
    id: str
    object: Literal["response"]
    created_at: int
    model: str
    status: str
    output: list[dict[str, Any]] = Field(description="Output items: messages, reasoning and function calls.")
    usage: ResponseUsage | None


class ResponseStreamEvent(_Open):
    """One streamed event (`event:` names its `type`): `response.created`, `response.output_text.delta`, ...,
    `response.completed` (with the response and its usage), or `error`."""

    type: str


# -- models and usage -----------------------------------------------------------------------------------------------


class Model(_Doc):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int = Field(description="The context length in tokens: prompt and completion together.")


class ModelList(_Doc):
    object: Literal["list"]
    data: list[Model]


Dkk = Annotated[str, Field(pattern=r"^-?[0-9]+(\.[0-9]+)?$", description="An exact decimal amount of DKK.")]


class UsageTotals(_Doc):
    requests: int
    input_uncached_tokens: int
    input_cached_tokens: int
    output_tokens: int
    cost_dkk: Dkk
    cost_input_uncached_dkk: Dkk
    cost_input_cached_dkk: Dkk
    cost_output_dkk: Dkk
    cost_nano_dkk: int


class UsageBucket(UsageTotals):
    start: datetime
    end: datetime
    model: str | None


class UsageReport(_Doc):
    object: Literal["list"]
    tenant: str
    scope: Literal["organization", "key"] = Field(description="`key` for a member: their own key's usage.")
    group_by: Literal["day", "model"] | None
    start: datetime
    end: datetime
    currency: Literal["DKK"]
    data: list[UsageBucket]
    totals: UsageTotals


class Plan(_Doc):
    name: str
    monthly_fee_dkk: Dkk
    discount_percent: Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)?$")]


class BudgetState(_Doc):
    scope: Literal["tenant", "key"]
    kind: Literal["monthly", "prepaid"]
    period: str
    limit_dkk: Dkk
    spent_dkk: Dkk
    reserved_dkk: Dkk
    left_dkk: Dkk


class UsageSummary(_Doc):
    object: Literal["usage.summary"]
    tenant: str
    key_id: str
    role: str
    month: str
    month_start: datetime
    month_end: datetime
    plan: Plan
    budget: BudgetState | None = Field(description="The tightest budget over the caller, if any.")
    totals: UsageTotals
