"""OpenAI wire protocol for requests: the accepted fields of chat and text completions, strictly typed.

Parameters Anker does not support are named and refused with a 400 instead of being ignored; parsing a body into
these models, with errors that quote no request value, is ``deployments/openai/parsing.py``. The models' JSON schemas
are the request bodies of the published OpenAPI document; where a validator refuses more than a field's type says
(tool turns, image parts, ``store``), the field's published schema (``WithJsonSchema``) says what is accepted.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, model_validator

from deployments.errors import InvalidValue, UnsupportedParameter, UnsupportedValue

MAX_N = 16
MAX_STOP = 4
MAX_STOP_CHARS = 256
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
MAX_PROMPTS = 64
MAX_TOKEN_ID = 2**31 - 1
INT64 = 2**63 - 1


def _integral(value: Any) -> Any:
    """``2.0`` is the integer 2 in JSON (and in JSON Schema); strings and fractions stay refused (strict mode)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# Integer types: bounds first (so that they reach the JSON schema), then 2.0 taken as 2.
Integral = BeforeValidator(_integral)
TokenId = Annotated[int, Integral]  # bounds checked with a message of their own (CompletionRequest)
N = Annotated[int, Field(ge=1, le=MAX_N), Integral]
Seed = Annotated[int, Field(ge=-(2**63), le=INT64), Integral]
# Beyond the context, a budget is refused by the tokenizer (context_length_exceeded); the bound keeps numbers short.
MaxTokens = Annotated[int, Field(ge=1, le=INT64), Integral]
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS), Integral]
CompletionLogprobs = Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS), Integral]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
# OpenAI's limits for metadata: accepted and not kept, but no bigger than there.
Metadata = Annotated[
    dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]], Field(max_length=16)
]


def _no_default(schema: dict[str, Any]) -> None:
    """For a field whose default (null) the published schema does not accept: it must be given."""
    schema.pop("default", None)


# Parameters that exist in OpenAI's API but that Anker does not implement: refused by name, never silently dropped.
UNSUPPORTED_CHAT = (
    "tools",
    "functions",
    "function_call",
    "logit_bias",
    "audio",
    "prediction",
    "web_search_options",
    "reasoning_effort",
    "verbosity",
    "prompt_cache_key",
    "safety_identifier",
)
UNSUPPORTED_COMPLETION = ("logit_bias",)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class StreamOptions(_Request):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class TextPart(_Request):
    type: Literal["text"]
    text: str


class OtherPart(BaseModel):
    """A content part of a kind Anker does not accept (images, audio, files): recognised so it can be refused."""

    model_config = ConfigDict(extra="allow", frozen=True)
    type: Literal["image_url", "input_audio", "file", "refusal"]


CHAT_ROLES = ("system", "developer", "user", "assistant")
TEXT_PART_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
    "required": ["type", "text"],
    "additionalProperties": False,
}


class ChatMessage(_Request):
    # Tool turns and non-text parts are parsed so that ``text`` can refuse them by name; the published schema leaves
    # them out, as it leaves out a message without content.
    model_config = ConfigDict(json_schema_extra={"required": ["role", "content"]})

    role: Annotated[
        Literal["system", "developer", "user", "assistant", "tool", "function"],
        WithJsonSchema({"type": "string", "enum": list(CHAT_ROLES)}),
    ]
    content: Annotated[
        str | list[TextPart | OtherPart] | None,
        WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "array", "items": TEXT_PART_SCHEMA}]}),
        Field(json_schema_extra=_no_default),
    ] = None
    name: str | None = Field(default=None, max_length=256)
    refusal: str | None = None
    tool_calls: Annotated[
        list[Any] | None,
        WithJsonSchema(
            {
                "anyOf": [{"type": "array", "maxItems": 0}, {"type": "null"}],
                "description": "Tool calling is not supported: empty or null.",
            }
        ),
    ] = None
    tool_call_id: Annotated[str | None, WithJsonSchema({"type": "null"})] = None
    function_call: Annotated[Any | None, WithJsonSchema({"type": "null"})] = None

    def text(self, index: int) -> str:
        """The message's text; non-text parts and tool turns are refused with the offending field named."""
        where = f"messages[{index}]"
        tool_turn = self.tool_call_id is not None or self.function_call is not None
        if self.role not in CHAT_ROLES or self.tool_calls or tool_turn:
            raise UnsupportedParameter("Tool and function calling are not supported by this model.", where)
        if self.content is None:
            raise InvalidValue(f"Invalid value for '{where}.content': a message must have content.", f"{where}.content")
        if isinstance(self.content, str):
            return self.content
        texts = []
        for part_index, part in enumerate(self.content):
            if isinstance(part, OtherPart):
                raise UnsupportedValue(
                    f"Content parts of type '{part.type}' are not supported by this model; only 'text' is.",
                    f"{where}.content[{part_index}].type",
                )
            texts.append(part.text)
        return "".join(texts)


class ResponseFormat(_Request):
    type: Annotated[
        Literal["text", "json_object", "json_schema"],
        WithJsonSchema({"const": "text", "description": "Only plain text is supported."}),
    ]
    json_schema: dict[str, Any] | None = None


STOP_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS},
        {
            "type": "array",
            "items": {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS},
            "maxItems": MAX_STOP,
        },
        {"type": "null"},
    ]
}


def _only_with(field: str, required: str) -> dict[str, Any]:
    """JSON schema: when ``field`` is given (not null), ``required`` must be true (what a model validator checks)."""
    return {
        "if": {"properties": {field: {"not": {"type": "null"}}}, "required": [field]},
        "then": {"properties": {required: {"const": True}}, "required": [required]},
    }


class _Common(_Request):
    model_config = ConfigDict(json_schema_extra={"allOf": [_only_with("stream_options", "stream")]})

    model: str = Field(min_length=1, max_length=256)
    n: N = 1
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: Seed | None = None
    stop: Annotated[str | list[str] | None, WithJsonSchema(STOP_SCHEMA)] = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = Field(default=None, description="Only with `stream: true`.")
    user: str | None = Field(default=None, max_length=256)

    @model_validator(mode="after")
    def _common_checks(self) -> _Common:
        if self.stream_options is not None and not self.stream:
            raise InvalidValue(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options"
            )
        stops = self.stop_list()
        if len(stops) > MAX_STOP:
            raise InvalidValue(f"'stop' may hold at most {MAX_STOP} sequences.", "stop")
        if any(not s for s in stops):
            raise InvalidValue("Stop sequences must not be empty.", "stop")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise InvalidValue(f"Stop sequences may be at most {MAX_STOP_CHARS} characters long.", "stop")
        return self

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Common):
    model_config = ConfigDict(
        json_schema_extra={"allOf": [_only_with("stream_options", "stream"), _only_with("top_logprobs", "logprobs")]}
    )

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = False
    top_logprobs: TopLogprobs | None = Field(default=None, description="Only with `logprobs: true`.")
    response_format: ResponseFormat | None = None
    tool_choice: Literal["none"] | None = None
    parallel_tool_calls: bool | None = None
    store: Annotated[
        bool | None,
        WithJsonSchema({"enum": [False, None], "description": "This service keeps no prompts or completions."}),
    ] = None
    metadata: Metadata | None = None
    service_tier: Literal["auto", "default"] | None = None
    modalities: list[Literal["text"]] | None = None

    @model_validator(mode="after")
    def _chat_checks(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidValue("'top_logprobs' requires 'logprobs' to be true.", "top_logprobs")
        if self.store:
            raise UnsupportedValue(
                "'store' must be false: this service keeps no prompts or completions (zero data retention).", "store"
            )
        if self.response_format is not None and self.response_format.type != "text":
            raise UnsupportedValue(
                f"response_format of type '{self.response_format.type}' is not supported; only 'text' is.",
                "response_format.type",
            )
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


_TOKEN_IDS: dict[str, Any] = {
    "type": "array",
    "items": {"type": "integer", "minimum": 0, "maximum": MAX_TOKEN_ID},
    "minItems": 1,
}
PROMPT_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": MAX_PROMPTS},
        _TOKEN_IDS,
        {"type": "array", "items": _TOKEN_IDS, "minItems": 1, "maxItems": MAX_PROMPTS},
    ],
    "description": "Text, texts, token ids (below the model's vocabulary size) or lists of token ids.",
}
Prompt = Annotated[str | list[str] | list[TokenId] | list[list[TokenId]], WithJsonSchema(PROMPT_SCHEMA)]


class CompletionRequest(_Common):
    prompt: Prompt
    max_tokens: MaxTokens | None = 16
    logprobs: CompletionLogprobs | None = None
    echo: Annotated[bool | None, WithJsonSchema({"enum": [False, None]})] = False
    best_of: N | None = Field(default=None, description="Only equal to `n`.")
    suffix: Annotated[str | None, WithJsonSchema({"anyOf": [{"type": "string", "maxLength": 0}, {"type": "null"}]})] = (
        None
    )

    @model_validator(mode="after")
    def _completion_checks(self) -> CompletionRequest:
        if self.echo:
            raise UnsupportedValue("'echo' is not supported.", "echo")
        if self.suffix:
            raise UnsupportedParameter("'suffix' is not supported.", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise UnsupportedValue("'best_of' is supported only when it equals 'n'.", "best_of")
        prompts = self.prompts()
        if not prompts:
            raise InvalidValue("'prompt' must not be empty.", "prompt")
        if len(prompts) > MAX_PROMPTS:
            raise InvalidValue(f"At most {MAX_PROMPTS} prompts per request.", "prompt")
        if any(
            not isinstance(t, int) or not 0 <= t <= MAX_TOKEN_ID for p in prompts if not isinstance(p, str) for t in p
        ):
            raise InvalidValue(f"Token ids must be integers from 0 to {MAX_TOKEN_ID}.", "prompt")
        if self.stream and len(prompts) * self.n > MAX_N:
            raise InvalidValue(f"A streamed request may ask for at most {MAX_N} choices in all.", "n")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            return []
        if isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]
