"""What agents and structured clients send, through the session's stack with the official ``openai`` SDK: HAProxy,
the model's own engine replica and its vLLM serving layer with the profile's parsers (``qwen3_coder`` tools,
``qwen3`` reasoning), structured outputs, and the Responses API; each billed exactly as its client was told.

tests/test_server_inprocess.py tests the same serving layer in process, case by case; here it is the product.
"""

from __future__ import annotations

import json
import time

import openai
import pytest

from tests.conftest import Stack
from tests.test_server_inprocess import ALARM, NO_THINKING, QUESTION, Weather
from tests.traffic import ledger_totals

pytestmark = pytest.mark.stack

MODEL = "qwen3-next-tiny"  # the hybrid family of the production model


@pytest.fixture
def tenant(stack: Stack, request: pytest.FixtureRequest) -> tuple[str, openai.OpenAI]:
    """A key of an organisation of the test's own (its ledger holds only the test's requests), and a client."""
    key = stack.new_key(f"api-{request.node.name[:40]}")
    return key, openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0, timeout=120)


def billed(stack: Stack, key: str, requests: int, output_tokens: int) -> dict[str, int]:
    """The key's ledger totals once ``requests`` are in it (usage arrives a moment after the answer)."""
    deadline = time.monotonic() + 60
    while (totals := ledger_totals(stack.base_url, key))["requests"] < requests and time.monotonic() < deadline:
        time.sleep(0.5)
    assert (totals["requests"], totals["output_tokens"]) == (requests, output_tokens), totals
    return totals


def test_a_required_tool_choice_yields_a_schema_valid_call(stack: Stack, tenant: tuple[str, openai.OpenAI]) -> None:
    key, client = tenant
    # Numbers and booleans only: random weights pad a string argument with whitespace until max_tokens runs out.
    answer = client.chat.completions.create(
        model=MODEL, messages=QUESTION, tools=[ALARM], tool_choice="required", max_tokens=120, extra_body=NO_THINKING
    )
    calls = answer.choices[0].message.tool_calls
    assert calls, answer
    for call in calls:
        assert call.function.name == "set_alarm", call  # type: ignore[union-attr]
        arguments = json.loads(call.function.arguments)  # type: ignore[union-attr]
        assert arguments["hour"] in (6, 7, 8) and isinstance(arguments["loud"], bool), call
    assert answer.usage is not None
    billed(stack, key, 1, answer.usage.completion_tokens)


def test_structured_outputs_parse_into_the_clients_model(stack: Stack, tenant: tuple[str, openai.OpenAI]) -> None:
    _, client = tenant
    answer = client.chat.completions.parse(
        model=MODEL, messages=QUESTION, response_format=Weather, max_tokens=60, extra_body=NO_THINKING
    )
    assert isinstance(answer.choices[0].message.parsed, Weather), answer.choices[0].message


def test_reasoning_is_split_from_content_and_billed_as_output(stack: Stack, tenant: tuple[str, openai.OpenAI]) -> None:
    key, client = tenant
    thinking = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12)
    # Random weights never close the <think> block the template opens: it is all reasoning, and counted so.
    assert thinking.usage is not None and thinking.usage.completion_tokens_details is not None
    assert thinking.usage.completion_tokens_details.reasoning_tokens == thinking.usage.completion_tokens > 0
    assert thinking.choices[0].message.content in (None, "")
    billed(stack, key, 1, thinking.usage.completion_tokens)


def test_the_responses_api_plain_and_streamed_billed_as_chat(stack: Stack, tenant: tuple[str, openai.OpenAI]) -> None:
    key, client = tenant
    response = client.responses.create(model=MODEL, input="Hej", max_output_tokens=16)
    assert response.usage is not None and response.usage.output_tokens == 16
    with client.responses.stream(model=MODEL, input="Hej igen", max_output_tokens=8) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    assert final.usage is not None and final.usage.output_tokens == 8
    billed(stack, key, 2, 24)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)  # nothing is stored
