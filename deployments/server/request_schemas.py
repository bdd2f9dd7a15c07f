"""The request bodies the engine replica takes, as the published API document describes them: one model per
endpoint, holding exactly the parameters of its allow-list (``requests.ALLOWED``) and the bounds ``requests.py``
holds. They describe; they validate nothing that is served (vLLM's own request models do, behind the allow-list).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from deployments.server.requests import (
    MAX_CHOICES,
    MAX_ID_CHARS,
    MAX_METADATA,
    MAX_METADATA_KEY,
    MAX_METADATA_VALUE,
    MAX_PROMPTS,
    MAX_STOP,
    MAX_STOP_CHARS,
    MAX_TOKEN_ID,
    ROLES,
)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
StopSequence = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Stop = StopSequence | Annotated[list[StopSequence], Field(max_length=MAX_STOP)]
Metadata = Annotated[
    dict[Annotated[str, Field(max_length=MAX_METADATA_KEY)], Annotated[str, Field(max_length=MAX_METADATA_VALUE)]],
    Field(max_length=MAX_METADATA),
]
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]


class StreamOptions(_Body):
    include_usage: bool | None = None


class Function(_Body):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="The arguments' JSON Schema.")
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: Function


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class ToolCallFunction(_Body):
    name: str
    arguments: str = Field(description="The call's arguments as a JSON string, as the model gave them.")


class ToolCall(_Body):
    id: str
    type: Literal["function"]
    function: ToolCallFunction


class ChatMessage(BaseModel):
    """A turn of the conversation: ``content`` as text or text parts; an assistant turn may carry ``tool_calls``,
    and a ``tool`` turn answers one by ``tool_call_id``."""

    model_config = ConfigDict(extra="allow")
    role: Literal[ROLES]  # type: ignore[valid-type]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning: str | None = None


class JsonSchemaFormat(_Body):
    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = Field(default=None, description="With `type: json_schema`.")


class ChatTemplateKwargs(_Body):
    enable_thinking: bool | None = Field(default=None, description="Whether a reasoning model thinks first.")


class _Sampling(_Body):
    model: str
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, description="-1 or 0: every token.")
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0)
    stream: bool | None = False
    user: str | None = Field(default=None, max_length=MAX_ID_CHARS["user"])


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    max_tokens: int | None = Field(default=None, ge=1, description="Deprecated by OpenAI for max_completion_tokens.")
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int | None = Field(default=1, ge=1, le=MAX_CHOICES)
    response_format: ResponseFormat | None = None
    seed: int | None = None
    stop: Stop | None = None
    stream_options: StreamOptions | None = None
    tools: list[Tool] | None = Field(default=None, min_length=1)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    safety_identifier: str | None = Field(default=None, max_length=MAX_ID_CHARS["safety_identifier"])
    prompt_cache_key: str | None = Field(default=None, max_length=MAX_ID_CHARS["prompt_cache_key"])
    metadata: Metadata | None = None
    store: Literal[False] | None = Field(default=None, description="Nothing is stored (zero data retention).")
    chat_template_kwargs: ChatTemplateKwargs | None = None


class CompletionRequest(_Sampling):
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=MAX_PROMPTS)]
    )
    echo: bool | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    logprobs: int | None = Field(default=None, ge=0, le=5)
    max_tokens: int | None = Field(default=16, ge=1)
    n: int | None = Field(default=1, ge=1, le=MAX_CHOICES)
    seed: int | None = None
    stop: Stop | None = None
    stream_options: StreamOptions | None = None
    suffix: str | None = None


class Reasoning(_Body):
    effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesRequest(_Sampling):
    input: str | Annotated[list[dict[str, Any]], Field(min_length=1)] = Field(
        description="Text, or the whole conversation as input items (nothing is stored to refer back to)."
    )
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    metadata: Metadata | None = None
    parallel_tool_calls: bool | None = None
    previous_response_id: None = Field(default=None, description="Always null: no response is stored.")
    reasoning: Reasoning | None = None
    store: bool | None = Field(default=None, description="Taken as false: nothing is stored (zero data retention).")
    text: dict[str, Any] | None = Field(default=None, description="The output's format (`text.format`).")
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    safety_identifier: str | None = Field(default=None, max_length=MAX_ID_CHARS["safety_identifier"])
    prompt_cache_key: str | None = Field(default=None, max_length=MAX_ID_CHARS["prompt_cache_key"])
    include: list[str] | None = None


REQUESTS: dict[str, type[_Body]] = {
    "chat": ChatCompletionRequest,
    "completions": CompletionRequest,
    "responses": ResponsesRequest,
}


def documented(endpoint: str) -> frozenset[str]:
    """The parameters the document names for ``endpoint`` (by their names on the wire)."""
    return frozenset(field.alias or name for name, field in REQUESTS[endpoint].model_fields.items())
