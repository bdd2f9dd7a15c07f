"""The replica's memo of vLLM's per-request parser build: same parses, the tokenizer's work done once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from deployments.server import parser_memo

MODEL = "qwen3-next-tiny"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "price",
            "parameters": {"type": "object", "properties": {"dish": {"type": "string"}}, "required": ["dish"]},
        },
    }
]
# Reasoning, a tool call in the qwen3_coder form, and the turn's end: a special token the grammar does not name, so
# the lexer drops it (what the memoised drop info is for).
OUTPUT = (
    "<think>\nThe user wants a price.\n</think>\n\n<tool_call>\n<function=price>\n"
    "<parameter=dish>\nrødgrød\n</parameter>\n</function>\n</tool_call><|im_end|>"
)


@pytest.fixture
def tokenizer(tiny_models: dict[str, Path]) -> object:
    from vllm.tokenizers import get_tokenizer

    return get_tokenizer(str(tiny_models[MODEL]))


@pytest.fixture
def restored() -> Iterator[None]:
    """Each test leaves the process as vLLM ships it."""
    parser_memo.uninstall()
    yield
    parser_memo.uninstall()


def _parse(tokenizer: object) -> tuple[object, ...]:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.parser.qwen3 import Qwen3Parser

    request = ChatCompletionRequest(
        model=MODEL, messages=[{"role": "user", "content": "Hvad koster det?"}], tools=TOOLS, tool_choice="auto"
    )
    ids = tokenizer.encode(OUTPUT, add_special_tokens=False)  # type: ignore[attr-defined]
    parser = Qwen3Parser(tokenizer)
    reasoning, content, calls = parser.parse(OUTPUT, request, enable_auto_tools=True, model_output_token_ids=ids)
    whole = (reasoning, content, [(c.name, c.arguments) for c in calls or []], parser.count_reasoning_tokens(ids))

    streamed = Qwen3Parser(tokenizer)
    deltas = []
    for i, token in enumerate(ids):
        delta = streamed.parse_delta(
            tokenizer.decode([token]),  # type: ignore[attr-defined]
            [token],
            request,
            finished=i == len(ids) - 1,
        )
        if delta is not None:
            deltas.append(delta.model_dump(exclude_none=True, exclude={"tool_calls": {"__all__": {"id"}}}))
    return whole, deltas


@pytest.mark.usefixtures("restored")
def test_memo_changes_no_parse_and_builds_once(tokenizer: object) -> None:
    from vllm.parser.engine import streaming_parser_engine

    shipped = streaming_parser_engine._build_drop_info
    as_shipped = _parse(tokenizer)
    (reasoning, content, calls, reasoning_tokens), deltas = as_shipped
    assert reasoning is not None and "price" in reasoning
    assert calls == [("price", '{"dish": "rødgrød"}')]
    assert "<|im_end|>" not in (content or "")
    assert reasoning_tokens > 0 and deltas

    memo = parser_memo.install()
    assert memo is not None and parser_memo.install() is memo  # idempotent
    assert streaming_parser_engine._build_drop_info is memo
    assert _parse(tokenizer) == as_shipped
    assert memo.hits >= 1  # the second parser of the same (config, tokenizer) reused the first one's
    built = memo(*_config_and(tokenizer))
    assert built is not None  # this tokenizer has special tokens the grammar does not name
    assert memo(*_config_and(tokenizer)) is built

    parser_memo.uninstall()
    assert streaming_parser_engine._build_drop_info is shipped


def _config_and(tokenizer: object) -> tuple[object, object]:
    from vllm.parser.qwen3 import qwen3_config

    return qwen3_config(), tokenizer


def test_memo_is_bounded_and_keyed_by_identity() -> None:
    built: list[tuple[object, object]] = []

    def build(config: object, tokenizer: object) -> object:
        built.append((config, tokenizer))
        return object()

    memo = parser_memo.DropInfoMemo(build, max_pairs=2)
    a, b, c, tokenizer = object(), object(), object(), object()
    first = memo(a, tokenizer)
    assert memo(a, tokenizer) is first and memo.hits == 1
    memo(b, tokenizer)
    memo(c, tokenizer)  # a is the oldest: it goes
    assert memo(a, tokenizer) is not first
    assert len(built) == 4
    # An equal but distinct config is another key: the memo never hands one config's lexer to another.
    assert memo([1], tokenizer) is not memo([1], tokenizer)
