"""What a client may send to vLLM's serving layer, and what vLLM's answers may tell the client.

vLLM's request models take every field ``vllm serve`` knows, including engine controls that no tenant of a shared
service may set (``cache_salt``, ``request_id``, ``priority``, ``kv_transfer_params``, ``chat_template``, …), and
they ignore unknown fields. So a body passes an allow-list per endpoint first: OpenAI's parameters and the sampling
extras Anker offers. vLLM's error messages can quote the input, so none reaches a client: each error becomes one of
Anker's, by its status and kind, with Anker's own words.
"""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.requests import Request

from deployments.errors import (
    AnkerError,
    ContextLengthExceeded,
    InternalError,
    InvalidJson,
    InvalidRequest,
    InvalidValue,
    ModelNotFound,
    RequestTooLarge,
    UnsupportedParameter,
    UnsupportedValue,
)

_SAMPLING_EXTRAS = {"top_k", "min_p", "repetition_penalty"}
_CHAT = {
    "messages",
    "model",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "presence_penalty",
    "response_format",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "temperature",
    "top_p",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "reasoning_effort",
    "metadata",
    "store",
    "chat_template_kwargs",
} | _SAMPLING_EXTRAS
_COMPLETIONS = {
    "model",
    "prompt",
    "echo",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "max_tokens",
    "n",
    "presence_penalty",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "suffix",
    "temperature",
    "top_p",
    "user",
} | _SAMPLING_EXTRAS
_RESPONSES = {
    "model",
    "input",
    "instructions",
    "max_output_tokens",
    "metadata",
    "parallel_tool_calls",
    "previous_response_id",
    "reasoning",
    "store",
    "stream",
    "temperature",
    "text",
    "tool_choice",
    "tools",
    "top_p",
    "truncation",
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "include",
} | _SAMPLING_EXTRAS
ALLOWED = {"chat": frozenset(_CHAT), "completions": frozenset(_COMPLETIONS), "responses": frozenset(_RESPONSES)}
# Correlation ids and hints for Anker (the router reads prompt_cache_key), never handed to the engine; and a
# previous_response_id that is null.
_STRIPPED = ("user", "safety_identifier", "prompt_cache_key", "metadata", "store", "previous_response_id")
_CHAT_TEMPLATE_KWARGS = frozenset({"enable_thinking"})
MAX_CHOICES = 16  # choices per request (``n``)
# OpenAI's bounds, which vLLM does not hold: stop sequences, metadata pairs, the correlation ids, prompts per request.
MAX_STOP = 4
MAX_STOP_CHARS = 256
MAX_METADATA = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
MAX_ID_CHARS = {"user": 256, "safety_identifier": 64, "prompt_cache_key": 256}
MAX_PROMPTS = 64
MAX_TOKEN_ID = 2**31 - 1
ROLES = ("system", "developer", "user", "assistant", "tool", "function")  # OpenAI's message roles
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # the escape of half a surrogate pair
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
NO_STORAGE = (
    "Responses are not stored (zero data retention), so they cannot be referred to: send the whole conversation in "
    "'input' instead."
)


def checked_body(raw: bytes, endpoint: str) -> dict[str, Any]:
    """The JSON object of a request to ``endpoint``, checked against its allow-list. Raises Anker's errors, whose
    messages name a parameter only if it is one Anker knows (a client's own word is request content)."""
    try:
        body = json.loads(raw, parse_float=_number)
    except (ValueError, RecursionError):
        raise InvalidJson("We could not parse the JSON body of your request. The body must be a JSON object.") from None
    if not isinstance(body, dict):
        raise InvalidJson("The request body must be a JSON object.")
    if _SURROGATE_ESCAPE.search(raw) is not None:
        try:  # a pair is one character; a lone half is no character, which no tokenizer takes
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidJson("The JSON body holds an invalid \\u escape (a lone surrogate).") from None
    allowed = ALLOWED[endpoint]
    for name in body:
        if name not in allowed:
            # A parameter's name is named back; a key that is not shaped like one may be text, and is not.
            named = isinstance(name, str) and _IDENTIFIER.match(name) is not None
            raise UnsupportedParameter(
                f"Unrecognized request argument supplied: {name}"
                if named
                else "Unrecognized request argument supplied.",
                name if named else None,
            )
    choices = body.get("n")  # (2.0 was parsed as the integer 2, as JSON Schema counts it)
    if choices is not None and (type(choices) is not int or not 1 <= choices <= MAX_CHOICES):
        # vLLM takes any n, and a key's rate limit would refuse a large one as if the client were too busy.
        raise InvalidValue(f"'n' must be an integer from 1 to {MAX_CHOICES}.", "n")
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and (not isinstance(kwargs, dict) or set(kwargs) - _CHAT_TEMPLATE_KWARGS):
        raise InvalidRequest("chat_template_kwargs may only set enable_thinking.", "chat_template_kwargs")
    if body.get("previous_response_id") is not None:
        raise InvalidRequest(NO_STORAGE, "previous_response_id")
    messages = body.get("messages") if endpoint == "chat" else None
    if messages == []:
        raise InvalidValue("'messages' must hold at least one message.", "messages")
    if isinstance(messages, list) and any(isinstance(m, dict) and m.get("role") not in ROLES for m in messages):
        # vLLM renders whatever role it is given into the chat template; OpenAI's roles are these.
        raise InvalidValue(f"Each message's 'role' must be one of: {', '.join(ROLES)}.", "messages")
    if endpoint == "chat" and body.get("store") is True:
        # Asked for outright (OpenAI's chat default is not to store): refused, since nothing is kept. The Responses
        # API stores by default, so there ``store`` is set false instead, and what would refer to it is refused.
        raise UnsupportedValue(
            "'store' must be false: this service keeps no prompts or completions (zero data retention).", "store"
        )
    _check_bounds(body, endpoint)
    # Then held to the published document's model, which builds on this module's bounds (hence imported here).
    from deployments.server.request_schemas import conforming

    body = conforming(body, endpoint)
    for name in _STRIPPED:
        body.pop(name, None)
    if endpoint == "responses":
        body["store"] = False
    return body


TURNS = {"chat": "messages", "responses": "input"}  # where an endpoint's body holds the conversation's turns
_IMAGE_PART = {"chat": "image_url", "responses": "input_image"}  # the type of an image part of a turn's content


def refuse_images(body: dict[str, Any], endpoint: str) -> None:
    """For a model that reads no images: an image part anywhere in the conversation is refused by name (vLLM
    refuses it without saying what it refused)."""
    if endpoint not in TURNS:
        return
    param, kind = TURNS[endpoint], _IMAGE_PART[endpoint]
    turns = body.get(param)
    if not isinstance(turns, list):
        return
    for turn in turns:
        content = turn.get("content") if isinstance(turn, dict) else None
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") == kind for p in content):
            raise UnsupportedValue("This model does not read images: send text only.", param)


def _number(text: str) -> int | float:
    """A JSON number with a fraction or exponent: an integer if it has no fractional part, as JSON Schema counts
    (``16.0`` is a valid ``max_tokens``)."""
    value = float(text)
    return int(value) if value.is_integer() and abs(value) <= 2**53 else value


def _check_bounds(body: dict[str, Any], endpoint: str) -> None:
    """OpenAI's bounds on what vLLM takes unbounded (or, for what Anker strips, never sees)."""
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise InvalidValue("'stop' must be a non-empty string or a list of non-empty strings.", "stop")
        if len(stops) > MAX_STOP:
            raise InvalidValue(f"'stop' may hold at most {MAX_STOP} sequences.", "stop")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise InvalidValue(f"Stop sequences may be at most {MAX_STOP_CHARS} characters long.", "stop")
    metadata = body.get("metadata")
    if metadata is not None and not (
        isinstance(metadata, dict)
        and len(metadata) <= MAX_METADATA
        and all(isinstance(k, str) and len(k) <= MAX_METADATA_KEY for k in metadata)
        and all(isinstance(v, str) and len(v) <= MAX_METADATA_VALUE for v in metadata.values())
    ):
        raise InvalidValue(
            f"'metadata' must map at most {MAX_METADATA} keys of up to {MAX_METADATA_KEY} characters to strings of "
            f"up to {MAX_METADATA_VALUE}.",
            "metadata",
        )
    for name, most in MAX_ID_CHARS.items():
        value = body.get(name)
        if value is not None and not (isinstance(value, str) and len(value) <= most):
            raise InvalidValue(f"'{name}' must be a string of at most {most} characters.", name)
    prompt = body.get("prompt") if endpoint == "completions" else None
    if prompt == [] or prompt == "":
        raise InvalidValue("'prompt' must not be empty.", "prompt")
    if isinstance(prompt, list):
        prompts = prompt if not all(isinstance(t, int) for t in prompt) else [prompt]
        if len(prompts) > MAX_PROMPTS:
            raise InvalidValue(f"At most {MAX_PROMPTS} prompts per request.", "prompt")
        ids = [t for p in prompts if isinstance(p, list) for t in p]
        if any(type(t) is not int or not 0 <= t <= MAX_TOKEN_ID for t in ids if not isinstance(t, float)):
            raise InvalidValue(f"Token ids must be integers from 0 to {MAX_TOKEN_ID}.", "prompt")


_KNOWN_NAMES = frozenset().union(*ALLOWED.values())


def from_vllm(error: dict[str, Any]) -> AnkerError:
    """One of vLLM's ``ErrorResponse`` bodies (``{"error": {"message", "type", "param", "code"}}``) as Anker's error.
    Its message is read to tell the kinds apart and is never repeated."""
    info = error.get("error") or {}
    status = int(info.get("code") or 500)
    message = str(info.get("message") or "")
    param = info.get("param") if info.get("param") in _KNOWN_NAMES else None
    if status == 400 and "context length" in message:
        return ContextLengthExceeded(
            "The prompt and the requested output do not fit in the model's context window.", "messages"
        )
    if status == 404:
        return ModelNotFound.unnamed()
    if status == 400 and "out of vocabulary" in message:  # a prompt of token ids (vLLM names no parameter)
        return InvalidValue("A token id of the prompt is not in the model's vocabulary.", param or "prompt")
    if 400 <= status < 500 and param:
        return InvalidValue(f"Invalid value for '{param}' for this model.", param)
    if 400 <= status < 500:
        return InvalidRequest("The request is not valid for this model.")
    return InternalError("The model could not complete the request.")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, read up to ``limit`` bytes (the config's ``server.max_request_bytes``): 413 beyond, whether or not
    the client declared its length."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(f"The request body is larger than the limit of {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(f"The request body is larger than the limit of {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)
