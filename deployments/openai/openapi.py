"""The published OpenAPI document of the customer API (``/v1``): the engine replica's routes (chat, completions,
responses) and the control application's (models, usage), their request bodies, responses and status codes,
OpenAI's error shape and the bearer scheme; ``python -m deployments.openai.openapi`` writes it to
``docs/openapi.json``, and the control application serves that file at ``/openapi.json``.

Requests are described by ``deployments/server/request_schemas.py`` (each endpoint's allow-list, exactly), the
generation responses by vLLM's own response models (what the replica serves), and the rest by
``response_schemas.py``. Nothing here validates or serves a request.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any, cast

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from deployments.openai.response_schemas import (
    ErrorResponse,
    Model,
    ModelList,
    ResponseObject,
    ResponseStreamEvent,
    UsageReport,
    UsageSummary,
)
from deployments.server.request_schemas import REQUESTS

DOCUMENT_PATH = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
REF = "#/components/schemas/{model}"
SECURITY_SCHEME = "apiKey"
CUSTOMER_API_PREFIX = "/v1/"

DESCRIPTION = """\
OpenAI-compatible chat completions (with tools, structured outputs and reasoning), text completions and the \
Responses API on the models this deployment serves, and the usage and cost of the caller's organisation. Every \
route takes an Anker API key (`Authorization: Bearer ank_...`); every completion names where it was processed \
(`x-anker-processing-region`).

A parameter this service does not take is refused with 400 `unsupported_parameter`, naming it in `param`, instead \
of being ignored; a value this document does not allow (of another type, out of range) is refused with 400 \
`invalid_value`, naming the parameter. A null is taken as not set. Every error has OpenAI's shape \
`{"error": {"message", "type", "param", "code"}}`; messages never quote the request's content. Nothing of a \
prompt or completion is kept after the response (zero data retention): `store` is false, and no response can be \
referred to later.
"""

# The generation responses: vLLM's own models, which the engine replica serializes (``deployments/server``).
VLLM_RESPONSES = {
    "ChatCompletionResponse": "vllm.entrypoints.openai.chat_completion.protocol",
    "ChatCompletionStreamResponse": "vllm.entrypoints.openai.chat_completion.protocol",
    "CompletionResponse": "vllm.entrypoints.openai.completion.protocol",
    "CompletionStreamResponse": "vllm.entrypoints.openai.completion.protocol",
}
COMPONENTS: tuple[type[BaseModel], ...] = (
    *REQUESTS.values(),
    ResponseObject,
    ResponseStreamEvent,
    ModelList,
    Model,
    UsageReport,
    UsageSummary,
    ErrorResponse,
)


# -- operations -----------------------------------------------------------------------------------------------------

ERRORS: dict[int, str] = {
    400: "The request is invalid: the body is not a JSON object (`invalid_json`), a parameter is unknown, unsupported "
    "or out of range (`invalid_value`, `unsupported_parameter`, `unsupported_value`), or prompt and completion do "
    "not fit the model's context (`context_length_exceeded`).",
    401: "No API key, or an invalid or revoked one (`invalid_api_key`).",
    403: "The key's role may not call models (`permission_denied`), or the model is not on the key's allow-list "
    "(`model_not_allowed`).",
    404: "The model does not exist (`model_not_found`).",
    413: "The request body is larger than the server's limit (`request_too_large`).",
    429: "The key's requests or tokens per minute are used up (`rate_limit_exceeded`), or a budget is "
    "(`insufficient_quota`).",
    500: "An unexpected error of the server (`internal_error`).",
    503: "Briefly unavailable: billing (`billing_unavailable`), the server shutting down for maintenance "
    "(`server_shutting_down`) or, for a completion, the model's engine, starting, restarting or at capacity "
    "(`engine_unavailable`, `engine_overloaded`).",
    504: "The model did not answer within the server's time limit, and the request was stopped (`engine_timeout`); "
    "a stream that waits too long for its next output ends with an `engine_timeout` error event instead.",
}
RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "required": True,
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }
}
RATE_LIMIT_HEADERS = {
    f"x-ratelimit-{what}-{unit}": {"description": description, "schema": {"type": "string"}}
    for unit in ("requests", "tokens")
    for what, description in (
        ("limit", f"The key's {unit} per minute."),
        ("remaining", f"The key's {unit} left in this minute."),
        ("reset", "When the window resets (`1s`, `6m0s`)."),
    )
}
GENERATION_HEADERS = {
    "x-anker-processing-region": {
        "description": "Where the request was processed (the model's residency).",
        "required": True,
        "schema": {"type": "string"},
    },
    "X-Request-Id": {
        "description": "The request's id, for correlation (a client's own is kept only if shaped like an id).",
        "schema": {"type": "string"},
    },
    **RATE_LIMIT_HEADERS,
}


def _ref(model: type[BaseModel] | str) -> dict[str, str]:
    return {"$ref": REF.format(model=model if isinstance(model, str) else model.__name__)}


def _event_stream(chunk: type[BaseModel] | str) -> dict[str, Any]:
    """One server-sent event (Open API 3.1 describes a stream by its events): a chunk, an error object (the last
    event before ``[DONE]`` of a stream that fails after it started), or ``[DONE]``."""
    payload = {"anyOf": [_ref(chunk), _ref(ErrorResponse)]}
    data = {
        "type": "string",
        "if": {"const": "[DONE]"},
        "else": {"contentMediaType": "application/json", "contentSchema": payload},
    }
    return {"schema": {"type": "object", "properties": {"data": data}, "required": ["data"]}}


def _error(status: int) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": ERRORS[status],
        "content": {"application/json": {"schema": _ref(ErrorResponse)}},
    }
    if status in (429, 503):
        response["headers"] = RETRY_AFTER
    return response


def route(
    summary: str,
    ok: type[BaseModel] | str,
    errors: tuple[int, ...],
    *,
    stream: type[BaseModel] | str | None = None,
    body: type[BaseModel] | None = None,
    example: dict[str, Any] | None = None,
    parameters: list[dict[str, Any]] | None = None,
    description: str | None = None,
) -> dict[str, Any]:
    """The documentation arguments of one route's decorator: summary, request body, responses with their errors."""
    content: dict[str, Any] = {"application/json": {"schema": _ref(ok)}}
    if stream is not None:
        content["text/event-stream"] = _event_stream(stream)
    success: dict[str, Any] = {"description": "OK" if stream is None else "OK: JSON, or events with `stream: true`."}
    success["content"] = content
    if body is not None:
        success["headers"] = GENERATION_HEADERS
    extra: dict[str, Any] = {}
    if body is not None:
        media: dict[str, Any] = {"schema": _ref(body)}
        if example is not None:
            media["example"] = example
        extra["requestBody"] = {"required": True, "content": {"application/json": media}}
    if parameters:
        extra["parameters"] = parameters
    return {
        "summary": summary,
        "description": description,
        "responses": {200: success, **{status: _error(status) for status in (*errors, 500)}},
        "openapi_extra": extra or None,
    }


def _time_parameter(name: str, description: str) -> dict[str, Any]:
    # The unix seconds that ``datetime`` can hold (years 1 to 9999); anything else is refused with 400.
    seconds = {"type": "integer", "minimum": -62135596800, "maximum": 253402300799}
    forms = [seconds, {"type": "string", "format": "date"}, {"type": "string", "format": "date-time"}]
    return {"name": name, "in": "query", "required": False, "description": description, "schema": {"anyOf": forms}}


GENERATION_ERRORS = (400, 401, 403, 404, 413, 429, 503, 504)
EXAMPLE_MODEL = "qwen3-moe-tiny"  # a model of the local profile (config/profiles/local.yaml)
CHAT_COMPLETIONS = route(
    "Create a chat completion",
    "ChatCompletionResponse",
    GENERATION_ERRORS,
    stream="ChatCompletionStreamResponse",
    body=REQUESTS["chat"],
    example={"model": EXAMPLE_MODEL, "messages": [{"role": "user", "content": "Hej!"}], "max_tokens": 16},
)
COMPLETIONS = route(
    "Create a text completion",
    "CompletionResponse",
    GENERATION_ERRORS,
    stream="CompletionStreamResponse",
    body=REQUESTS["completions"],
    example={"model": EXAMPLE_MODEL, "prompt": "Danmarks hovedstad er", "max_tokens": 8},
)
RESPONSES = route(
    "Create a model response",
    ResponseObject,
    GENERATION_ERRORS,
    stream=ResponseStreamEvent,
    body=REQUESTS["responses"],
    example={"model": EXAMPLE_MODEL, "input": "Hej!", "max_output_tokens": 16},
)
LIST_MODELS = route("List the models this key may use", ModelList, (401, 503))
GET_MODEL = route("Retrieve a model", Model, (401, 403, 404, 503))
USAGE = route(
    "Usage and cost in a time range",
    UsageReport,
    (400, 401, 503),
    description="Usage of the caller's organisation (a member's: their own key's) in [start, end), in total and by "
    "day or model. The range defaults to the current month; `end` must be after `start`.",
    parameters=[
        _time_parameter("start", "Start of the range: unix seconds, an ISO date or an ISO date-time (UTC if naive)."),
        _time_parameter("end", "End of the range (exclusive), in the same forms as `start`."),
        _time_parameter("start_time", "The same as `start`, as OpenAI's usage API names it."),
        _time_parameter("end_time", "The same as `end`."),
        {"name": "group_by", "in": "query", "required": False, "schema": {"enum": ["day", "model"]}},
    ],
)
USAGE_SUMMARY = route("This month's usage, plan and budget", UsageSummary, (401, 503))


def document(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document: FastAPI's paths, with the components, security and responses made exact."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    # The customer API only: /admin is the operator's (its own CLI and token), /healthz and /dashboard are not an API.
    routes = [r for r in app.routes if getattr(r, "path", "").startswith(CUSTOMER_API_PREFIX)]
    doc = get_openapi(title=app.title, version=app.version, description=DESCRIPTION, routes=routes)
    for operations in doc["paths"].values():
        for operation in operations.values():
            # FastAPI declares 422 for parameter validation; this app never answers 422 (it is 400 in OpenAI's shape).
            operation["responses"].pop("422", None)
    import importlib

    vllm = [getattr(importlib.import_module(module), name) for name, module in VLLM_RESPONSES.items()]
    described = [(model, "validation") for model in COMPONENTS] + [(model, "serialization") for model in vllm]
    _, schemas = models_json_schema(described, ref_template=REF)  # type: ignore[arg-type]
    doc["components"] = {
        "schemas": schemas["$defs"],
        "securitySchemes": {
            SECURITY_SCHEME: {
                "type": "http",
                "scheme": "bearer",
                "description": "An Anker API key, `ank_<id>_<secret>` (`anker keys create --tenant NAME`).",
            }
        },
    }
    doc["security"] = [{SECURITY_SCHEME: []}]
    app.openapi_schema = doc
    return doc


def openapi_document() -> dict[str, Any]:
    """The published document, from the routes as they are served: the control application's and the engine
    replica's. It depends on the routes only, so neither is built with a service behind it."""
    from deployments.openai.accounts import Accounts
    from deployments.openai.control_app import Catalog, accounts_app
    from deployments.server import chat, completions, responses

    app = accounts_app(cast(Catalog, None), cast(Accounts, None))
    for endpoint in (chat, completions, responses):
        app.include_router(endpoint.router)
    return document(app)


@functools.cache
def published() -> dict[str, Any]:
    """``docs/openapi.json`` as committed (the test suite holds it equal to ``openapi_document()``): what the control
    application serves at ``/openapi.json``, without importing vLLM to describe vLLM's responses."""
    return json.loads(DOCUMENT_PATH.read_text())  # type: ignore[no-any-return]


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deployments.openai.openapi", description="Write the published OpenAPI document."
    )
    parser.add_argument("--output", type=Path, default=DOCUMENT_PATH, help="where to write it (%(default)s)")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file differs from the code instead")
    args = parser.parse_args(argv)
    text = render(openapi_document())
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is out of date: run python -m deployments.openai.openapi", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
