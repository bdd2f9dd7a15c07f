"""The engine replica's request allow-list and its mapping of vLLM's errors (deployments/server/requests.py),
without an engine: what a client may set, and that no vLLM message reaches a client."""

from __future__ import annotations

import json

import pytest

from deployments.errors import (
    ContextLengthExceeded,
    InternalError,
    InvalidJson,
    InvalidRequest,
    InvalidValue,
    ModelNotFound,
    UnsupportedValue,
)
from deployments.server.requests import ALLOWED, NO_STORAGE, checked_body, from_vllm, refuse_images


def body(**fields: object) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hej"}], **fields}).encode()


def test_correlation_ids_and_hints_never_reach_the_engine() -> None:
    checked = checked_body(body(user="u-1", safety_identifier="s", prompt_cache_key="k", metadata={"a": "b"}), "chat")
    assert set(checked) == {"model", "messages"}


def test_the_responses_api_never_stores() -> None:
    assert (
        checked_body(json.dumps({"model": "m", "input": "hej", "store": True}).encode(), "responses")["store"] is False
    )
    with pytest.raises(InvalidRequest) as refused:
        checked_body(json.dumps({"model": "m", "input": "hej", "previous_response_id": "resp_1"}).encode(), "responses")
    assert (refused.value.message, refused.value.param) == (NO_STORAGE, "previous_response_id")


@pytest.mark.parametrize("endpoint", sorted(ALLOWED))
def test_vllms_engine_controls_are_not_a_clients(endpoint: str) -> None:
    for name in ("cache_salt", "request_id", "priority", "kv_transfer_params", "chat_template", "vllm_xargs"):
        with pytest.raises(InvalidRequest) as refused:
            checked_body(json.dumps({"model": "m", name: 1}).encode(), endpoint)
        assert refused.value.param == name


def test_chat_template_kwargs_may_only_switch_thinking() -> None:
    assert checked_body(body(chat_template_kwargs={"enable_thinking": False}), "chat")["chat_template_kwargs"]
    with pytest.raises(InvalidRequest):
        checked_body(body(chat_template_kwargs={"tools_in_system_prompt": "x"}), "chat")


@pytest.mark.parametrize("raw", [b"", b"[1]", b'{"model": ', b"null"])
def test_a_body_that_is_no_json_object_is_invalid_json(raw: bytes) -> None:
    with pytest.raises(InvalidJson):
        checked_body(raw, "chat")


def test_vllms_messages_are_never_repeated() -> None:
    secret = "kodeordet er blåbær"
    cases = [
        (
            {"code": 400, "message": f"This model's maximum context length is 2048 tokens: {secret}"},
            ContextLengthExceeded,
        ),
        ({"code": 404, "message": f"The model `{secret}` does not exist."}, ModelNotFound),
        ({"code": 400, "message": f"'{secret}' is not a valid value", "param": "temperature"}, InvalidValue),
        ({"code": 400, "message": secret, "param": secret}, InvalidRequest),
        ({"code": 500, "message": secret}, InternalError),
        ({}, InternalError),
    ]
    for info, kind in cases:
        error = from_vllm({"error": info})
        assert type(error) is kind, info
        assert secret not in error.message and secret not in str(error.param), error
    assert from_vllm({"error": cases[2][0]}).param == "temperature"


@pytest.mark.parametrize("n", [0, 17, 1000, 2.5, "4", True])
def test_more_choices_than_a_request_may_ask_for_are_an_invalid_n(n: object) -> None:
    with pytest.raises(InvalidValue) as refused:
        checked_body(body(n=n), "chat")
    assert refused.value.param == "n"
    assert checked_body(body(n=16), "chat")["n"] == 16
    assert checked_body(body(n=2.0), "chat")["n"] == 2.0  # the integer 2, as JSON Schema counts it


def test_an_empty_conversation_or_prompt_is_an_invalid_value_that_says_which() -> None:
    for raw, endpoint, param in (
        (json.dumps({"model": "m", "messages": []}).encode(), "chat", "messages"),
        (json.dumps({"model": "m", "prompt": []}).encode(), "completions", "prompt"),
        (json.dumps({"model": "m", "prompt": ""}).encode(), "completions", "prompt"),
    ):
        with pytest.raises(InvalidValue) as refused:
            checked_body(raw, endpoint)
        assert refused.value.param == param


def test_a_lone_surrogate_is_invalid_json_and_a_pair_is_one_character() -> None:
    lone = b'{"model": "m", "messages": [{"role": "user", "content": "a\\ud800"}]}'
    with pytest.raises(InvalidJson):
        checked_body(lone, "chat")
    pair = b'{"model": "m", "messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}'
    assert checked_body(pair, "chat")["messages"][0]["content"] == "\U0001f600"


def test_a_chat_that_asks_to_be_stored_is_refused_and_one_that_does_not_passes() -> None:
    with pytest.raises(UnsupportedValue) as refused:
        checked_body(body(store=True), "chat")
    assert refused.value.param == "store" and "zero data retention" in refused.value.message
    assert "store" not in checked_body(body(store=False), "chat")


def test_a_message_of_a_role_openai_does_not_have_is_an_invalid_value() -> None:
    with pytest.raises(InvalidValue) as refused:
        checked_body(body(messages=[{"role": "hemmelig-rolle", "content": "hej"}]), "chat")
    assert refused.value.param == "messages" and "hemmelig" not in str(refused.value)
    for role in ("system", "developer", "user", "assistant"):
        assert checked_body(body(messages=[{"role": role, "content": "hej"}]), "chat")
    assert checked_body(body(messages=[{"role": "tool", "content": "42", "tool_call_id": "c1"}]), "chat")
    assert checked_body(body(messages=[{"role": "function", "content": "42", "name": "f"}]), "chat")
    with pytest.raises(InvalidValue):  # a tool's answer says which call it answers
        checked_body(body(messages=[{"role": "tool", "content": "42"}]), "chat")


def test_an_image_for_a_model_that_reads_none_is_refused_by_name() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVq"}}
    with pytest.raises(UnsupportedValue) as refused:
        refuse_images({"messages": [{"role": "user", "content": [image]}]}, "chat")
    assert refused.value.param == "messages"
    with pytest.raises(UnsupportedValue):
        refuse_images(
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "responses"
        )
    refuse_images({"messages": [{"role": "user", "content": [{"type": "text", "text": "hej"}]}]}, "chat")
    refuse_images({"prompt": "hej"}, "completions")
