"""The tiny models speak Qwen3.5's chat format (cluster/tiny_models.py::CHAT_TEMPLATE), so that vLLM's `qwen3`
reasoning parser and `qwen3_coder` tool parser, which the local profile names as production's does, read their
output as they read the production model's. Rendered with the model's own tokenizer, parsed with vLLM's parser."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from config.settings import DEFAULT_PROFILE, load_config

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Vejret i en dansk by.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "Byen"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
]
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": {"city": "Aarhus", "days": 2}},
}


@pytest.fixture(scope="module")
def tokenizer(tiny_models: dict[str, Path]) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(tiny_models["qwen3-moe-tiny"]))


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    assert isinstance(text, str)
    return text


def test_tools_are_described_in_the_system_turn(tokenizer: PreTrainedTokenizerBase) -> None:
    text = render(
        tokenizer,
        [{"role": "system", "content": "Svar kort."}, {"role": "user", "content": "Vejret?"}],
        tools=TOOLS,
        add_generation_prompt=True,
    )
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nSvar kort.\n\n# Tools")
    assert "<function>\n<name>get_weather</name>\n<description>Vejret i en dansk by.</description>" in system
    assert "<parameter>\n<name>days</name>\n<type>integer</type>\n</parameter>" in system
    assert '<required>["city"]</required>' in system
    assert "<tool_call>\n<function=NAME>\n<parameter=KEY>\nVALUE\n</parameter>\n</function>\n</tool_call>" in system
    assert text.count("<|im_start|>system") == 1  # the client's system message is that turn, not another one
    # Without tools, no system turn is made up.
    assert render(tokenizer, [{"role": "user", "content": "hej"}]).startswith("<|im_start|>user\nhej<|im_end|>")


def test_an_assistant_tool_call_reads_back_through_vllms_parser(tokenizer: PreTrainedTokenizerBase) -> None:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.tool_parsers import ToolParserManager

    history = [
        {"role": "user", "content": "Vejret?"},
        {"role": "assistant", "content": "Jeg ser efter.", "tool_calls": [CALL]},
    ]
    turn = render(tokenizer, history, tools=TOOLS).split("<|im_start|>assistant\n")[-1].split("<|im_end|>")[0]
    assert turn == (
        "Jeg ser efter.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nAarhus\n</parameter>\n"
        "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>"
    )
    parser = ToolParserManager.get_tool_parser(load_config(DEFAULT_PROFILE, {}).models[1].serving.tool_call_parser)
    request = ChatCompletionRequest(model="qwen3-moe-tiny", messages=history[:1], tools=TOOLS, tool_choice="auto")
    found = parser(tokenizer, None).extract_tool_calls(turn, request)
    assert found.tools_called and found.content == "Jeg ser efter."
    [call] = found.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Aarhus", "days": 2})


def test_tool_results_share_the_users_turn_and_reasoning_stays_only_after_the_last_question(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    history = [
        {"role": "user", "content": "Vejret?"},
        {"role": "assistant", "content": "", "reasoning_content": "Gammel tanke.", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature_c": 4}'},
        {"role": "tool", "tool_call_id": "call_2", "content": "ingen regn"},
        {"role": "assistant", "content": "Fire grader.", "reasoning_content": "Jeg har svaret."},
        {"role": "user", "content": "Og i morgen?"},
        {"role": "assistant", "content": "", "reasoning_content": "Ny tanke.", "tool_calls": [CALL]},
    ]
    text = render(tokenizer, history, tools=TOOLS)
    assert (
        '<|im_start|>user\n<tool_response>\n{"temperature_c": 4}\n</tool_response>\n'
        "<tool_response>\ningen regn\n</tool_response><|im_end|>\n"
    ) in text
    assert "Gammel tanke." not in text and "Jeg har svaret." not in text
    assert "<|im_start|>assistant\n<think>\nNy tanke.\n</think>\n\n<tool_call>" in text


def test_the_assistants_turn_opens_a_think_block_unless_thinking_is_off(tokenizer: PreTrainedTokenizerBase) -> None:
    question = [{"role": "user", "content": [{"type": "text", "text": "hej"}]}]
    assert render(tokenizer, question, add_generation_prompt=True).endswith("<|im_start|>assistant\n<think>\n")
    off = render(tokenizer, question, add_generation_prompt=True, enable_thinking=False)
    assert off == "<|im_start|>user\nhej<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_the_local_profile_uses_productions_parsers() -> None:
    production = load_config(DEFAULT_PROFILE.with_name("qwen35-397b-fp8-h200-tp8.yaml"), {}).models[0].serving
    for model in load_config(DEFAULT_PROFILE, {}).models:
        assert model.serving == production, model.name
