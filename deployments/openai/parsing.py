"""Request bodies into the typed models of ``deployments/openai/protocol.py``, with errors in OpenAI's terms.

Nothing here logs, and no error it raises quotes a request value: pydantic errors are rendered without their input,
paths into client-chosen keys are cut off, the JSON parser's complaint is replaced by what it means, and a name is
repeated only if it is one of our or OpenAI's parameter names.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ValidationError

from deployments.errors import InvalidJson, InvalidRequest, InvalidValue, UnsupportedParameter
from deployments.openai.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ResponseFormat,
    StreamOptions,
    TextPart,
)

# Names of the request models' fields: a path into a request stops at the first key that is not one of them (a
# ``metadata`` key, say), so that no client-chosen key reaches an error message.
_FIELDS = frozenset(
    name
    for model in (ChatCompletionRequest, CompletionRequest, ChatMessage, TextPart, ResponseFormat, StreamOptions)
    for name in model.model_fields
)
# Location parts that pydantic adds for the branches of a union, not keys of the request.
_BRANCHES = frozenset({"str", "int", "bool", "float", "list", "dict", "union_tag", "TextPart", "OtherPart"})
# The forms of the fields that take one of several types: a mismatch is reported as these, not as the first form's.
_FORMS = {
    "content": "a string or a list of text parts",
    "stop": "a string or a list of strings",
    "prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
}
# Names of OpenAI's request parameters that Anker does not take: an error may name them, as they are OpenAI's words.
_OPENAI_NAMES = frozenset(
    {
        "audio",
        "function_call",
        "functions",
        "logit_bias",
        "modalities",
        "parallel_tool_calls",
        "prediction",
        "reasoning_effort",
        "service_tier",
        "store",
        "tool_choice",
        "tools",
        "web_search_options",
    }
)
# What the JSON parser's complaint means, by its first words; the complaint itself is never shown.
_JSON_PROBLEMS = {
    "EOF while parsing": "it ends early",
    "recursion limit exceeded": "it is nested too deeply",
    "number out of range": "a number is out of range",
    "invalid unicode code point": "it is not valid UTF-8",
    "control character": "a string holds a raw control character",
    "invalid escape": "a string holds an invalid escape",
    "unexpected end of hex escape": "a string holds an invalid escape",
    "lone leading surrogate": "a string holds an invalid escape",
    "trailing characters": "there is more after the JSON value",
}
_JSON_POSITION = re.compile(r" at line (\d+) column (\d+)$")


def parameter_name(name: str, known: frozenset[str] = frozenset()) -> str | None:
    """``name`` if it is one of OpenAI's (or ``known``) parameter names, so that an error may repeat it; None for
    any other name: a client's own word is request content, and no error message repeats request content."""
    return name if name in _FIELDS or name in _OPENAI_NAMES or name in known else None


def _is_branch(part: Any) -> bool:
    return isinstance(part, str) and (part in _BRANCHES or "[" in part)


def _field_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif _is_branch(part):
            continue
        elif part in _FIELDS:
            path += f".{part}" if path else str(part)
        else:
            break  # a client-chosen key (of ``metadata``, say): the path names the field that holds it
    return path


def _unparsable(error: dict[str, Any]) -> InvalidJson:
    complaint = str((error.get("ctx") or {}).get("error", ""))
    problem = next((text for start, text in _JSON_PROBLEMS.items() if complaint.startswith(start)), None)
    position = _JSON_POSITION.search(complaint)
    detail = ""
    if problem == "it ends early" and position is not None and position.group(2) == "0":
        detail = " (the body is empty)"
    elif problem is not None:
        detail = f" ({problem}" + (f", at line {position[1]} column {position[2]})" if position else ")")
    return InvalidJson(
        f"We could not parse the JSON body of your request{detail}. The body must be a JSON object. "
        "(HINT: This likely means you aren't using your HTTP library correctly.)"
    )


def _unrecognized(loc: tuple[Any, ...], unsupported: tuple[str, ...]) -> InvalidRequest:
    name, parent = str(loc[-1]), _field_path(loc[:-1])
    if len(loc) == 1 and name in unsupported:
        return UnsupportedParameter(f"The parameter '{name}' is not supported by this service.", name)
    if parameter_name(name):
        full = f"{parent}.{name}" if parent else name
        return InvalidRequest(f"Unrecognized request argument supplied: {full}", full)
    # Not shaped like a parameter name (it may be text): refused without repeating it.
    where = f" in '{parent}'" if parent else ""
    return InvalidRequest(f"Unrecognized request argument supplied{where}.", parent or None)


def parse_request(model_cls: type[BaseModel], body: bytes, unsupported: tuple[str, ...]) -> Any:
    """Validates a JSON body into ``model_cls``; raises ``InvalidRequest`` subclasses in OpenAI's terms."""
    try:
        return model_cls.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False, include_context=True)
        first = errors[0]
        kind = first["type"]
        if kind == "json_invalid":
            raise _unparsable(dict(first)) from None
        if kind in ("json_type", "model_type") and not first["loc"]:
            raise InvalidJson("The request body must be a JSON object.") from None
        unknown = next((e for e in errors if e["type"] == "extra_forbidden"), None)
        if unknown is not None:
            raise _unrecognized(tuple(unknown["loc"]), unsupported) from None
        # An error raised by our own validators (InvalidRequest) comes back wrapped in the pydantic error's context.
        cause = (first.get("ctx") or {}).get("error")
        if isinstance(cause, InvalidRequest):
            raise cause from None
        loc = tuple(first["loc"])
        branch = next((i for i, part in enumerate(loc) if _is_branch(part)), 0)
        forms = _FORMS.get(str(loc[branch - 1])) if branch else None
        if forms is not None:
            name = _field_path(loc[:branch])
            raise InvalidValue(f"Invalid value for '{name}': it must be {forms}.", name) from None
        name = _field_path(loc)
        if kind == "missing":
            raise InvalidRequest(f"Missing required parameter: '{name}'.", name) from None
        raise InvalidValue(f"Invalid value for '{name}': {first['msg']}.", name) from None
