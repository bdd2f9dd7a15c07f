"""OpenAI wire protocol for requests: the accepted fields of chat and text completions, strictly typed.

Parameters Anker does not support are named and refused here with a 400 instead of being ignored. Nothing in this
module logs, and no error it raises quotes a request value (pydantic errors are rendered without their input).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from deployments.errors import InvalidJson, InvalidRequest, InvalidValue, UnsupportedParameter, UnsupportedValue

MAX_N = 16
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
MAX_PROMPTS = 64
INT64 = 2**63 - 1

Seed = Annotated[int, Field(ge=-(2**63), le=INT64)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]

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


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart | OtherPart] | None = None
    name: str | None = Field(default=None, max_length=256)
    refusal: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None
    function_call: Any | None = None

    def text(self, index: int) -> str:
        """The message's text; non-text parts and tool turns are refused with the offending field named."""
        where = f"messages[{index}]"
        if self.role in ("tool", "function") or self.tool_calls or self.function_call or self.tool_call_id:
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
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class _Common(_Request):
    model: str = Field(min_length=1, max_length=256)
    n: int = Field(default=1, ge=1, le=MAX_N)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: Seed | None = None
    stop: str | list[str] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
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
        return self

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tool_choice: Literal["none"] | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
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


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_Common):
    prompt: Prompt
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool | None = False
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)
    suffix: str | None = None

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


def _field_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in ("str", "list", "int", "function-after", "union_tag") or "[" in str(part):
            continue  # union-branch markers that pydantic adds to the location
        else:
            path += f".{part}" if path else str(part)
    return path


def parse_request(model_cls: type[_Request], body: bytes, unsupported: tuple[str, ...]) -> Any:
    """Validates a JSON body into ``model_cls``; raises ``InvalidRequest`` subclasses in OpenAI's terms."""
    try:
        return model_cls.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False, include_context=True)
        first = errors[0]
        kind = first["type"]
        if kind == "json_invalid" or (kind == "json_type" and not first["loc"]):
            raise InvalidJson(
                "We could not parse the JSON body of your request. The body must be a JSON object. "
                "(HINT: This likely means you aren't using your HTTP library correctly.)"
            ) from None
        if kind == "model_type" and not first["loc"]:
            raise InvalidJson("The request body must be a JSON object.") from None
        unknown = next((e for e in errors if e["type"] == "extra_forbidden"), None)
        if unknown is not None:
            name = _field_path(unknown["loc"])
            if len(unknown["loc"]) == 1 and name in unsupported:
                raise UnsupportedParameter(f"The parameter '{name}' is not supported by this service.", name) from None
            raise InvalidRequest(f"Unrecognized request argument supplied: {name}", name) from None
        # An error raised by our own validators (InvalidRequest) comes back wrapped in the pydantic error's context.
        cause = (first.get("ctx") or {}).get("error")
        if isinstance(cause, InvalidRequest):
            raise cause from None
        name = _field_path(first["loc"])
        if kind == "missing":
            raise InvalidRequest(f"Missing required parameter: '{name}'.", name) from None
        raise InvalidRequest(f"Invalid value for '{name}': {first['msg']}.", name) from None
