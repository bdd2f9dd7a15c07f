"""OpenAI's response shapes as pydantic models, for the published OpenAPI document only: the routes build their
responses as plain dicts (``responses.py``, the billing service) and never validate against these.

Each model is closed (no undocumented field), so the schemathesis run in the test suite fails on any drift between a
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


# -- completions ----------------------------------------------------------------------------------------------------

FinishReason = Literal["stop", "length"]


class PromptTokensDetails(_Doc):
    cached_tokens: int = Field(description="Prompt tokens served from the prefix cache.")
    audio_tokens: int


class CompletionTokensDetails(_Doc):
    reasoning_tokens: int
    audio_tokens: int
    accepted_prediction_tokens: int
    rejected_prediction_tokens: int


class CompletionUsage(_Doc):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails


class TopLogprob(_Doc):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Doc):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None


class AssistantMessage(_Doc):
    role: Literal["assistant"]
    content: str | None
    refusal: str | None
    annotations: list[Any]


class ChatChoice(_Doc):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(_Doc):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str | None
    service_tier: str | None
    choices: list[ChatChoice]
    usage: CompletionUsage


class ChatDelta(_Doc):
    role: Literal["assistant"] = Field(default="assistant", description="In each choice's first chunk only.")
    content: str


class ChatChunkChoice(_Doc):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(_Doc):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: str | None
    service_tier: str | None
    choices: list[ChatChunkChoice]
    usage: CompletionUsage | None = Field(
        default=None, description="With `stream_options.include_usage` only: null, then set in the last chunk."
    )


class CompletionLogprobs(_Doc):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(_Doc):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason


class TextCompletion(_Doc):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[CompletionChoice]
    usage: CompletionUsage


class CompletionChunkChoice(_Doc):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None


class TextCompletionChunk(_Doc):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[CompletionChunkChoice]
    usage: CompletionUsage | None = Field(
        default=None, description="With `stream_options.include_usage` only: null, then set in the last chunk."
    )


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
