"""The request bodies the engine replica takes, as the published API document describes them: one model per
endpoint, holding exactly the parameters of its allow-list (``requests.ALLOWED``) and the bounds ``requests.py``
holds. The door holds every body to them (``checked_body`` calls ``conforming``) before vLLM's own request models,
which are lax (``true`` is an integer to them) and some of whose checks fail on a wrong type rather than refuse it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema

from deployments.errors import InvalidValue
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
    TURNS,
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
LogitBias = dict[Annotated[str, Field(pattern=r"^[0-9]+$")], Annotated[float, Field(ge=-100, le=100)]]


def _false(value: bool) -> bool:
    if value:
        raise ValueError("must be false: nothing is stored")
    return value


# false: a boolean (``0`` is none, though Python's ``0 == False``, which a Literal[False] would take) that is false.
NotStored = Annotated[bool, AfterValidator(_false), WithJsonSchema({"const": False})]


class StreamOptions(_Body):
    include_usage: bool | None = None


class FunctionDefinition(_Body):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="The arguments' JSON Schema.")
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class ToolCallFunction(_Body):
    name: str
    arguments: str = Field(description="The call's arguments as a JSON string, as the model gave them.")


class AssistantToolCall(_Body):
    id: str
    type: Literal["function"]
    function: ToolCallFunction


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImageUrl(_Body):
    url: str = Field(description="An image's URL or data URL, for a model that reads images.")
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageUrl


def _optional(**field: Any) -> Any:
    """A field that may be left out but is never null: vLLM's types of a turn's parts take no null there."""
    return Field(default=None, json_schema_extra=_no_default, **field)


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


class SystemMessage(_Body):
    role: Literal["system", "developer"]
    content: str | Annotated[list[TextPart], Field(min_length=1)]
    name: str | None = None


class UserMessage(_Body):
    role: Literal["user"]
    content: str | Annotated[list[TextPart | ImagePart], Field(min_length=1)]
    name: str | None = None


class AssistantMessage(_Body):
    """An assistant turn: its text, or the ``tool_calls`` it made; sent back as the SDK gave it (with its
    ``refusal``, ``annotations``, ``audio`` and ``function_call``), it is taken as it is."""

    role: Literal["assistant"]
    content: str | Annotated[list[TextPart], Field(min_length=1)] | None = None
    name: str | None = None
    tool_calls: list[AssistantToolCall] | None = None
    reasoning: str | None = None
    refusal: str | None = None
    annotations: list[dict[str, Any]] | None = None
    audio: None = Field(default=None, description="Always null: no model here speaks.")
    function_call: None = Field(default=None, description="Always null: deprecated by OpenAI for tool_calls.")


class ToolMessage(_Body):
    """A tool's answer to the assistant's call ``tool_call_id``."""

    role: Literal["tool"]
    content: str | Annotated[list[TextPart], Field(min_length=1)]
    tool_call_id: str


class FunctionMessage(_Body):
    """Deprecated by OpenAI for ``tool`` turns."""

    role: Literal["function"]
    content: str | None
    name: str


Message = Annotated[
    SystemMessage | UserMessage | AssistantMessage | ToolMessage | FunctionMessage, Field(discriminator="role")
]


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
    messages: list[Message] = Field(min_length=1)
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    logit_bias: LogitBias | None = Field(default=None, description="Token ids (as strings) to their bias.")
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
    store: NotStored | None = Field(default=None, description="Nothing is stored (zero data retention).")
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
    logit_bias: LogitBias | None = Field(default=None, description="Token ids (as strings) to their bias.")
    logprobs: int | None = Field(default=None, ge=0, le=5)
    max_tokens: int | None = Field(default=16, ge=1)
    n: int | None = Field(default=1, ge=1, le=MAX_CHOICES)
    seed: int | None = None
    stop: Stop | None = None
    stream_options: StreamOptions | None = None
    suffix: None = Field(default=None, description="Always null: vLLM does not insert after a completion.")


class ReasoningOptions(_Body):
    effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


# What ``include`` may name: vLLM's list (tests/test_request_schemas.py holds them equal).
INCLUDABLE = (
    "code_interpreter_call.outputs",
    "computer_call_output.output.image_url",
    "file_search_call.results",
    "message.input_image.image_url",
    "message.output_text.logprobs",
    "reasoning.encrypted_content",
)


class _Item(BaseModel):
    """An input item: the fields that say what it is; the rest of an item a client echoes back (an output item's
    ``id``, ``status``, ``annotations``) is left to vLLM."""

    model_config = ConfigDict(extra="allow")


class InputText(_Item):
    type: Literal["input_text"]
    text: str


class OutputText(_Item):
    type: Literal["output_text"]
    text: str


class InputImage(_Item):
    type: Literal["input_image"]
    image_url: str = Field(description="An image's URL or data URL, for a model that reads images.")
    detail: Literal["auto", "low", "high"] = _optional()


class InputMessage(_Item):
    """A turn as text or parts; a list of no parts is refused (vLLM fails on one rather than refusing it)."""

    type: Literal["message"] | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | Annotated[list[InputText | InputImage], Field(min_length=1)]


class OutputMessage(_Item):
    """An assistant's message as the response gave it, sent back in the conversation."""

    type: Literal["message"]
    role: Literal["assistant"]
    content: list[OutputText] = Field(min_length=1)


class FunctionCallItem(_Item):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str = Field(description="The call's arguments as a JSON string.")


class FunctionCallOutputItem(_Item):
    type: Literal["function_call_output"]
    call_id: str
    output: str


class SummaryText(_Body):
    type: Literal["summary_text"]
    text: str


class ReasoningText(_Body):
    type: Literal["reasoning_text"]
    text: str


class ReasoningItem(_Item):
    type: Literal["reasoning"]
    id: str
    summary: list[SummaryText]
    content: list[ReasoningText] | None = None


class FunctionTool(_Body):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="The arguments' JSON Schema.")
    strict: bool | None = None


InputItem = InputMessage | OutputMessage | FunctionCallItem | FunctionCallOutputItem | ReasoningItem


class ResponsesRequest(_Sampling):
    input: str | Annotated[list[InputItem], Field(min_length=1)] = Field(
        description="Text, or the whole conversation as input items (nothing is stored to refer back to)."
    )
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    metadata: Metadata | None = None
    parallel_tool_calls: bool | None = None
    previous_response_id: None = Field(default=None, description="Always null: no response is stored.")
    reasoning: ReasoningOptions | None = None
    store: bool | None = Field(default=None, description="Taken as false: nothing is stored (zero data retention).")
    text: dict[str, Any] | None = Field(default=None, description="The output's format (`text.format`).")
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    tools: list[FunctionTool] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    safety_identifier: str | None = Field(default=None, max_length=MAX_ID_CHARS["safety_identifier"])
    prompt_cache_key: str | None = Field(default=None, max_length=MAX_ID_CHARS["prompt_cache_key"])
    include: list[Literal[INCLUDABLE]] | None = None  # type: ignore[valid-type]


REQUESTS: dict[str, type[_Body]] = {
    "chat": ChatCompletionRequest,
    "completions": CompletionRequest,
    "responses": ResponsesRequest,
}


def documented(endpoint: str) -> frozenset[str]:
    """The parameters the document names for ``endpoint`` (by their names on the wire)."""
    return frozenset(field.alias or name for name, field in REQUESTS[endpoint].model_fields.items())


def conforming(body: dict[str, Any], endpoint: str) -> dict[str, Any]:
    """``body`` (past ``checked_body``'s own checks) if the document allows it for ``endpoint``, typed strictly as JSON
    Schema types it (``true`` is no integer, ``"5"`` no number), without its nulls at the top and in each turn:
    OpenAI takes a null for "not set", and vLLM does not always (the Responses API's ``tool_choice``). Raises
    ``InvalidValue`` that names the top-level parameter and what it must be, never the value."""
    try:
        REQUESTS[endpoint].model_validate(body, strict=True)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False, include_context=False)[0]
        param = str(first["loc"][0]) if first["loc"] else None
        if first["type"] == "missing" and len(first["loc"]) == 1:
            raise InvalidValue(f"Missing required parameter: '{param}'.", param) from None
        where = f"'{param}'" if param is not None else "the request body"
        raise InvalidValue(f"Invalid value for {where}: {first['msg']}.", param) from None
    body = {name: value for name, value in body.items() if value is not None}
    # A null in a turn is not set either: vLLM takes an assistant turn's ``tool_calls: null`` only beside a
    # ``content``, and an input item's ``type: null`` not at all.
    turns = body.get(TURNS.get(endpoint, ""))
    if isinstance(turns, list):  # (validated: each turn is an object)
        body[TURNS[endpoint]] = [{k: v for k, v in turn.items() if v is not None} for turn in turns]
    return body
