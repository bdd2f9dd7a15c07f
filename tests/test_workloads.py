"""The load-test workloads and the stream timer (loadtests/workloads.py), without a server."""

from __future__ import annotations

import itertools
import json
import random

from loadtests.workloads import SHARED_SYSTEM_PROMPT, Conversation, StreamTimer, shared_prefix, short_chat


def test_workloads_are_deterministic_and_share_only_the_prefix() -> None:
    assert short_chat(random.Random(1)) == short_chat(random.Random(1))
    rng = random.Random(2)
    first, second = shared_prefix(rng), shared_prefix(rng)
    assert first.messages[0] == second.messages[0] == {"role": "system", "content": SHARED_SYSTEM_PROMPT}
    assert first.messages[1] != second.messages[1]
    assert first.body("m") == {
        "model": "m",
        "messages": first.messages,
        "max_tokens": 32,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_a_conversation_carries_every_earlier_turn() -> None:
    conversation = Conversation(random.Random(3))
    turns = 0
    while not conversation.done:
        request = conversation.next_request()
        turns += 1
        assert [m["role"] for m in request.messages] == ["system"] + ["user", "assistant"] * (turns - 1) + ["user"]
        conversation.add_reply(f"reply {turns}")
    assert 4 <= turns <= 6
    assert request.messages[-2] == {"role": "assistant", "content": f"reply {turns - 1}"}


def _events(*payloads: object) -> bytes:
    return b"".join(b"data: " + (p if isinstance(p, bytes) else json.dumps(p).encode()) + b"\n\n" for p in payloads)


def _chunk(content: str, finish: str | None = None) -> dict[str, object]:
    return {"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}], "usage": None}


USAGE = {
    "choices": [],
    "usage": {"prompt_tokens": 40, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 32}},
}


def test_the_timer_measures_a_stream_split_anywhere() -> None:
    raw = _events(_chunk(""), _chunk("a"), _chunk("b"), _chunk("c", "length"), USAGE, b"[DONE]")
    timer = StreamTimer(started_s=10.0)
    cuts = [0, 7, 150, 151, 300, len(raw)]  # byte boundaries that split events and lines
    for n, (start, end) in enumerate(itertools.pairwise(cuts)):
        timer.feed(raw[start:end], now_s=11.0 + n)
    result = timer.result(now_s=20.0)
    assert result.error is None
    assert (result.output_tokens, result.prompt_tokens, result.cached_tokens) == (3, 40, 32)
    assert result.ttft_s is not None and result.ttft_s > 0 and result.total_s == 10.0
    assert len(result.itl_s) == 2 and result.text == "abc"
    assert result.output_tokens_per_s == 0.3
    assert "abc" not in repr(result)


def test_the_timer_reports_errors_by_code() -> None:
    timer = StreamTimer(0.0)
    timer.feed(_events(_chunk("a"), {"error": {"message": "m", "code": "engine_failed"}}, b"[DONE]"), 1.0)
    assert timer.result(2.0).error == "engine_failed"

    cut_off = StreamTimer(0.0)
    cut_off.feed(_events(_chunk("a")), 1.0)
    assert cut_off.result(2.0).error == "incomplete_stream"

    no_usage = StreamTimer(0.0)
    no_usage.feed(_events(_chunk("a", "stop"), b"[DONE]"), 1.0)
    assert no_usage.result(2.0).error == "missing_usage"

    assert StreamTimer(0.0).failed("429 rate_limit_exceeded", 1.0).error == "429 rate_limit_exceeded"


def test_a_token_of_reasoning_is_output_as_one_of_content() -> None:
    """vLLM's reasoning parser streams thinking as ``delta.reasoning``: the first of it is the first token."""
    role = {"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}], "usage": None}
    thought = {"choices": [{"index": 0, "delta": {"reasoning": "hm"}, "finish_reason": None}], "usage": None}
    timer = StreamTimer(started_s=0.0)
    timer.feed(_events(role), now_s=1.0)
    timer.feed(_events(thought), now_s=2.0)
    timer.feed(_events(_chunk("ja", "stop"), USAGE, b"[DONE]"), now_s=3.0)
    result = timer.result(now_s=4.0)
    assert result.ttft_s == 2.0 and result.itl_s == [1.0] and result.text == "hmja"
