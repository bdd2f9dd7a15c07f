"""The published OpenAPI document: docs/openapi.json is what the code generates from the served routes (the engine
replica's and the control application's), the control application serves it without a key, it is valid Open API
3.1, and it covers the customer API and nothing else."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import httpx
import schemathesis

from deployments.openai import openapi
from deployments.openai.accounts import Accounts
from deployments.openai.control_app import Catalog, accounts_app
from deployments.openai.openapi import openapi_document

CUSTOMER_API = {
    ("get", "/v1/models"),
    ("get", "/v1/models/{model_id}"),
    ("get", "/v1/usage"),
    ("get", "/v1/usage/summary"),
    ("post", "/v1/chat/completions"),
    ("post", "/v1/completions"),
    ("post", "/v1/responses"),
}
ERROR_SCHEMA = {"$ref": "#/components/schemas/ErrorResponse"}


def test_committed_document_is_the_generated_one() -> None:
    committed = openapi.DOCUMENT_PATH.read_text()
    assert committed == openapi.render(openapi_document()), (
        "docs/openapi.json is out of date: run `python -m deployments.openai.openapi`"
    )


def test_generator_writes_and_checks_the_file(tmp_path: Path) -> None:
    target = tmp_path / "openapi.json"
    assert openapi.main(["--check", "--output", str(target)]) == 1  # missing: out of date
    assert openapi.main(["--output", str(target)]) == 0
    assert json.loads(target.read_text()) == openapi_document()
    assert openapi.main(["--check", "--output", str(target)]) == 0


async def test_the_control_application_serves_the_document_without_a_key() -> None:
    app = accounts_app(cast(Catalog, None), cast(Accounts, None))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://anker") as client:
        response = await client.get("/openapi.json")
        assert response.status_code == 200 and response.json() == openapi_document()
        for hidden in ("/docs", "/redoc"):
            assert (await client.get(hidden)).status_code == 404


def test_document_is_valid_openapi_31() -> None:
    doc = openapi_document()
    assert doc["openapi"].startswith("3.1")
    schemathesis.openapi.from_dict(doc).validate()


def test_document_covers_the_customer_api_only() -> None:
    doc = openapi_document()
    operations = {(method, path) for path, item in doc["paths"].items() for method in item}
    assert operations == CUSTOMER_API  # no /admin, /dashboard or /healthz
    assert doc["security"] == [{"apiKey": []}]
    scheme = doc["components"]["securitySchemes"]["apiKey"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")


def test_every_error_status_has_openai_error_shape() -> None:
    doc = openapi_document()
    error = doc["components"]["schemas"]["ErrorDetail"]
    assert set(error["required"]) == {"message", "type", "param", "code"}
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            responses: dict[str, Any] = operation["responses"]
            assert "422" not in responses  # FastAPI's validation error: this app answers 400 in OpenAI's shape
            for status, response in responses.items():
                if status != "200":
                    assert response["content"]["application/json"]["schema"] == ERROR_SCHEMA, (method, path, status)
                if status in ("429", "503"):
                    assert response["headers"]["Retry-After"]["required"] is True, (method, path, status)
    generation = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert set(generation) == {"200", "400", "401", "403", "404", "413", "429", "500", "503", "504"}
    assert set(generation["200"]["content"]) == {"application/json", "text/event-stream"}


def test_request_bodies_are_each_endpoints_allow_list() -> None:
    from deployments.server.requests import ALLOWED, MAX_CHOICES

    doc = openapi_document()
    schemas = doc["components"]["schemas"]
    for path, endpoint, name in (
        ("/v1/chat/completions", "chat", "ChatCompletionRequest"),
        ("/v1/completions", "completions", "CompletionRequest"),
        ("/v1/responses", "responses", "ResponsesRequest"),
    ):
        body = doc["paths"][path]["post"]["requestBody"]
        assert body["required"] is True
        assert body["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{name}"}
        assert schemas[name]["additionalProperties"] is False and set(schemas[name]["properties"]) == ALLOWED[endpoint]
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert chat["n"]["anyOf"][0]["maximum"] == MAX_CHOICES
    assert {"tools", "tool_choice", "response_format", "reasoning_effort"} <= set(chat)


def test_generation_responses_are_vllms_own_models() -> None:
    doc = openapi_document()
    schemas = doc["components"]["schemas"]
    ok = doc["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert ok["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatCompletionResponse"}
    usage = schemas["UsageInfo"]["properties"]
    assert {"prompt_tokens", "completion_tokens", "prompt_tokens_details"} <= set(usage)
