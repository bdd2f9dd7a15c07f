"""Tracing on the real stack: one streaming request is one trace across the engine replica that serves it (its
door's server span, with the replica's id, and admission below it) and the billing actor (which grants a new key's
first request its lease), exported over OTLP by every deployment, joined to the client's ``traceparent``, and free
of prompt and completion text.
"""

from __future__ import annotations

import secrets
import time

import httpx
import pytest

from testkit.otlp import OtlpReceiver, ReceivedSpan
from tests.conftest import Stack

pytestmark = pytest.mark.stack

CANARY = "Fyrtårnet ved Skagen tæller skibe"


def wait_for_trace(otlp: OtlpReceiver, trace_id: str, names: set[str], timeout_s: float = 60) -> list[ReceivedSpan]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        spans = otlp.trace(trace_id)
        if names <= {s.name for s in spans}:
            return spans
        time.sleep(0.5)
    raise AssertionError(f"spans missing: {sorted(names - {s.name for s in otlp.trace(trace_id)})}")


def test_a_streaming_request_is_one_trace_across_the_deployments(stack: Stack, otlp: OtlpReceiver) -> None:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    body = {
        "model": "qwen3-next-tiny",
        "messages": [{"role": "user", "content": CANARY}],
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True},
        "chat_template_kwargs": {"enable_thinking": False},  # the completion's text is content
    }
    key = stack.new_key("tracing")  # its first request: the replica holds nothing of it and asks billing for a lease
    headers = {"Authorization": f"Bearer {key}", "traceparent": f"00-{trace_id}-{parent_id}-01"}
    with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body, headers=headers, timeout=120) as r:
        assert r.status_code == 200
        completion = "".join(r.iter_lines())
    names = {"POST /v1/chat/completions", "admission", "billing.lease"}
    spans = wait_for_trace(otlp, trace_id, names)
    by_name = {s.name: s for s in spans}
    server = by_name["POST /v1/chat/completions"]
    assert server.parent_span_id == parent_id and server.service == "anker-engine-qwen3-next-tiny"
    assert server.attributes["anker.engine_replica"] and server.attributes["anker.model"] == "qwen3-next-tiny"
    assert 1 <= server.attributes["anker.completion_tokens"] <= 6 and server.attributes["anker.prompt_tokens"] > 0
    assert by_name["admission"].parent_span_id == server.span_id
    assert by_name["billing.lease"].parent_span_id == by_name["admission"].span_id
    assert by_name["billing.lease"].service == "anker-billing"
    assert server.attributes["http.response.status_code"] == 200
    # Zero data retention: neither the prompt nor any of the completion's text is in any span.
    text = "".join(p.split('"')[0] for p in completion.split('"content":"')[1:])
    for s in spans:
        exported = s.name + repr(s.attributes)
        assert CANARY not in exported and "Skagen" not in exported
        # The whole completion (short pieces could match ids by chance).
        assert len(text) < 12 or text not in exported
