"""Request validation in OpenAI's terms: what is accepted, what is refused, and that no error quotes the input."""

from __future__ import annotations

import json

import pytest

from deployments.errors import InvalidJson, InvalidRequest, UnsupportedParameter, UnsupportedValue
from deployments.openai.parsing import parse_request
from deployments.openai.protocol import (
    UNSUPPORTED_CHAT,
    UNSUPPORTED_COMPLETION,
    ChatCompletionRequest,
    CompletionRequest,
)

CANARY = "ZDR-CANARY-7f3a"


def chat(**fields: object) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return parse_request(ChatCompletionRequest, json.dumps(body).encode(), UNSUPPORTED_CHAT)


def completion(**fields: object) -> CompletionRequest:
    body = {"model": "m", "prompt": "hi", **fields}
    return parse_request(CompletionRequest, json.dumps(body).encode(), UNSUPPORTED_COMPLETION)


def refused(call: object, **fields: object) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        call(**fields)  # type: ignore[operator]
    assert CANARY not in str(info.value), "an error message quoted the request's content"
    return info.value


def test_full_chat_request_is_accepted() -> None:
    req = chat(
        n=2,
        max_tokens=5,
        temperature=0.7,
        top_p=0.9,
        seed=7,
        stop=["\n", "END"],
        logprobs=True,
        top_logprobs=3,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        user="u-1",
        stream=True,
        stream_options={"include_usage": True},
        response_format={"type": "text"},
        store=False,
        metadata={"k": "v"},
        service_tier="auto",
    )
    assert req.n == 2 and req.requested_max_tokens == 5 and req.stop_list() == ("\n", "END")
    assert req.logprobs_k == 3 and req.include_usage


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert chat(max_tokens=5, max_completion_tokens=9).requested_max_tokens == 9
    assert chat().requested_max_tokens is None


def test_text_parts_and_developer_role() -> None:
    req = chat(
        messages=[{"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    )
    assert req.messages[0].text(0) == "ab"


@pytest.mark.parametrize("body", [b"{bad", b"", b"[1, 2]", b'"text"', b"\xff\xfe", b"[" * 5000])
def test_malformed_bodies_are_invalid_json(body: bytes) -> None:
    with pytest.raises(InvalidJson) as info:
        parse_request(ChatCompletionRequest, body, UNSUPPORTED_CHAT)
    assert info.value.status == 400


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": CANARY}, "max_tokens"),
        ({"max_tokens": "5"}, "max_tokens"),  # strict types: a string is not a number
        ({"temperature": 3}, "temperature"),
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
        ({"top_p": 1.5}, "top_p"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": CANARY}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": CANARY}]}, "messages[0].role"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"seed": 2**64}, "seed"),
        ({"logprobs": "yes"}, "logprobs"),
    ],
)
def test_bad_values_name_the_field(fields: dict[str, object], param: str) -> None:
    error = refused(chat, **fields)
    assert error.status == 400
    assert error.param == param, error.message


def test_missing_model_is_named() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_request(ChatCompletionRequest, b'{"messages": [{"role": "user", "content": "x"}]}', UNSUPPORTED_CHAT)
    assert info.value.param == "model" and "Missing required parameter" in info.value.message


def test_unknown_fields_are_refused_without_repeating_the_clients_words() -> None:
    error = refused(chat, frobnicate=CANARY)
    assert error.param is None and "Unrecognized request argument" in error.message
    assert "frobnicate" not in error.message  # a client's own name is request content
    error = refused(chat, **{CANARY: 1})
    assert CANARY not in error.message and error.param is None


@pytest.mark.parametrize("name", ["tools", "functions", "logit_bias", "audio", "reasoning_effort"])
def test_known_unsupported_parameters_get_a_clear_400(name: str) -> None:
    error = refused(chat, **{name: []})
    assert isinstance(error, UnsupportedParameter) and error.code == "unsupported_parameter" and error.param == name


@pytest.mark.parametrize(
    "fields",
    [
        {"store": True},
        {"response_format": {"type": "json_object"}},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": CANARY}}]}]},
    ],
)
def test_unsupported_values_are_refused(fields: dict[str, object]) -> None:
    req_or_error: object
    try:
        req_or_error = chat(**fields)
        req_or_error.messages[0].text(0)  # type: ignore[attr-defined]
    except InvalidRequest as error:
        req_or_error = error
    assert isinstance(req_or_error, UnsupportedValue)
    assert CANARY not in req_or_error.message


def test_tool_turns_are_refused() -> None:
    req = chat(messages=[{"role": "tool", "content": "x", "tool_call_id": "c1"}])
    with pytest.raises(UnsupportedParameter):
        req.messages[0].text(0)


def test_completion_prompt_forms() -> None:
    assert completion(prompt="a").prompts() == ["a"]
    assert completion(prompt=["a", "b"]).prompts() == ["a", "b"]
    assert completion(prompt=[1, 2, 3]).prompts() == [[1, 2, 3]]
    assert completion(prompt=[[1, 2], [3]]).prompts() == [[1, 2], [3]]
    assert completion().max_tokens == 16  # OpenAI's default for text completions


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt": []}, "prompt"),
        ({"echo": True}, "echo"),
        ({"suffix": CANARY}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"logprobs": 6}, "logprobs"),
        ({"logit_bias": {"1": 2}}, "logit_bias"),
        ({"prompt": [1.5]}, "prompt"),
    ],
)
def test_bad_completion_requests(fields: dict[str, object], param: str) -> None:
    assert refused(completion, **fields).param == param
