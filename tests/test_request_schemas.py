"""The request bodies the published document describes (``deployments/server/request_schemas.py``) name exactly
what the replica's allow-lists take, and hold what its checks hold: so the document cannot drift from the door."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from deployments.errors import AnkerError
from deployments.server.request_schemas import REQUESTS, documented
from deployments.server.requests import ALLOWED, MAX_CHOICES, MAX_STOP, checked_body

BODIES: dict[str, dict[str, Any]] = {
    "chat": {
        "model": "m",
        "messages": [
            {"role": "user", "content": "Hej"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "42"},
        ],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}}},
        "reasoning_effort": "low",
        "stream": True,
        "stream_options": {"include_usage": True},
        "chat_template_kwargs": {"enable_thinking": False},
    },
    "completions": {"model": "m", "prompt": ["a", "b"], "max_tokens": 3, "logprobs": 2, "stop": ["x"]},
    "responses": {"model": "m", "input": "Hej", "reasoning": {"effort": "low"}, "max_output_tokens": 5},
}


@pytest.mark.parametrize("endpoint", sorted(ALLOWED))
def test_each_endpoint_documents_exactly_what_its_allow_list_takes(endpoint: str) -> None:
    assert documented(endpoint) == ALLOWED[endpoint]
    json.dumps(REQUESTS[endpoint].model_json_schema())  # renders


@pytest.mark.parametrize("endpoint", sorted(BODIES))
def test_a_body_the_door_takes_is_one_the_document_describes(endpoint: str) -> None:
    body = BODIES[endpoint]
    checked_body(json.dumps(body).encode(), endpoint)
    REQUESTS[endpoint].model_validate(body)


@pytest.mark.parametrize(
    ("endpoint", "change"),
    [
        ("chat", {"cache_salt": "x"}),
        ("chat", {"n": MAX_CHOICES + 1}),
        ("chat", {"stop": ["s"] * (MAX_STOP + 1)}),
        ("chat", {"chat_template_kwargs": {"thinking_budget": 3}}),
        ("chat", {"messages": []}),
        ("chat", {"store": True}),
        ("completions", {"priority": 1}),
        ("responses", {"previous_response_id": "resp_1"}),
    ],
)
def test_a_body_the_door_refuses_is_one_the_document_excludes(endpoint: str, change: dict[str, Any]) -> None:
    body = {**BODIES[endpoint], **change}
    with pytest.raises(AnkerError):
        checked_body(json.dumps(body).encode(), endpoint)
    with pytest.raises(ValidationError):
        REQUESTS[endpoint].model_validate(body)
