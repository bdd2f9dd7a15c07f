"""The request bodies the published document describes (``deployments/server/request_schemas.py``) name exactly
what the replica's allow-lists take, and hold what its checks hold: so the document cannot drift from the door.
The door then holds every body to them, as strictly as JSON Schema types it."""

from __future__ import annotations

import json
import typing
from typing import Any

import pytest
from pydantic import ValidationError

from deployments.errors import AnkerError, InvalidValue
from deployments.server.request_schemas import INCLUDABLE, REQUESTS, documented
from deployments.server.requests import ALLOWED, MAX_CHOICES, MAX_STOP, ROLES, checked_body

BODIES: dict[str, dict[str, Any]] = {
    "chat": {
        "model": "m",
        "messages": [
            {"role": "user", "content": "Hej"},
            {
                "role": "assistant",
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
    "responses": {
        "model": "m",
        # A tool turn as the Agents SDK sends it back: output items echoed with their ids and statuses.
        "input": [
            {"role": "user", "content": "Hej"},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "function_call", "id": "fc_1", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "42"},
            {
                "type": "message",
                "id": "msg_1",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": "42", "annotations": []}],
            },
        ],
        "reasoning": {"effort": "low"},
        "max_output_tokens": 5,
        "include": ["reasoning.encrypted_content"],
    },
}


@pytest.mark.parametrize("endpoint", sorted(ALLOWED))
def test_each_endpoint_documents_exactly_what_its_allow_list_takes(endpoint: str) -> None:
    assert documented(endpoint) == ALLOWED[endpoint]
    json.dumps(REQUESTS[endpoint].model_json_schema())  # renders


@pytest.mark.parametrize("endpoint", sorted(BODIES))
def test_a_body_the_door_takes_is_one_the_document_describes(endpoint: str) -> None:
    body = BODIES[endpoint]
    taken = checked_body(json.dumps(body).encode(), endpoint)
    assert taken == ({**body, "store": False} if endpoint == "responses" else body)  # nothing is stored
    REQUESTS[endpoint].model_validate(body)


def test_each_role_has_its_message() -> None:
    messages = REQUESTS["chat"].model_json_schema()["properties"]["messages"]["items"]
    assert set(messages["discriminator"]["mapping"]) == set(ROLES)


def test_nulls_are_not_set_and_integral_numbers_are_integers() -> None:
    raw = b'{"model": "m", "input": "Hej", "tool_choice": null, "max_output_tokens": 16.0, "temperature": 1}'
    assert checked_body(raw, "responses") == {
        "model": "m",
        "input": "Hej",
        "max_output_tokens": 16,
        "temperature": 1,
        "store": False,
    }


def test_a_turns_nulls_are_not_set() -> None:
    # As the SDK gives an assistant's message back: vLLM takes its `tool_calls: null` only beside a content.
    answer = {"role": "assistant", "content": None, "tool_calls": None, "refusal": None, "audio": None}
    raw = json.dumps({"model": "m", "messages": [{"role": "user", "content": "Hej"}, answer]}).encode()
    assert checked_body(raw, "chat")["messages"][1] == {"role": "assistant"}
    raw = json.dumps({"model": "m", "input": [{"type": None, "role": "user", "content": "Hej"}]}).encode()
    assert checked_body(raw, "responses")["input"] == [{"role": "user", "content": "Hej"}]


def test_include_names_what_vllm_includes() -> None:
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest

    annotation = ResponsesRequest.model_fields["include"].annotation
    (listed,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    assert set(typing.get_args(typing.get_args(listed)[0])) == set(INCLUDABLE)


@pytest.mark.parametrize(
    ("endpoint", "change", "param"),
    [
        # What vLLM's lax models would take (false as 0), or fail on (len() of a bool), or render into the template.
        ("completions", {"seed": False}, "seed"),
        ("completions", {"logprobs": "hemmelig"}, "logprobs"),
        ("responses", {"tools": False}, "tools"),
        ("responses", {"include": [""]}, "include"),
        ("responses", {"input": [{}]}, "input"),
        ("responses", {"input": [{"type": "message", "role": "assistant", "content": []}]}, "input"),  # vLLM: 500
        ("chat", {"chat_template_kwargs": {"enable_thinking": {}}}, "chat_template_kwargs"),
        ("chat", {"messages": [{"role": "tool", "content": [{}]}]}, "messages"),
        ("chat", {"model": None}, "model"),
        ("chat", {"store": 0}, "store"),  # checked before it is taken off
    ],
)
def test_what_the_document_excludes_is_a_400_that_names_the_parameter(
    endpoint: str, change: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidValue) as refused:
        checked_body(json.dumps({**BODIES[endpoint], **change}).encode(), endpoint)
    assert refused.value.param == param
    assert "hemmelig" not in str(refused.value)


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
