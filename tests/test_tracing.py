"""Tracing in-process: the span tree of a streaming request (ingress, admission and billing, tokenizer, engine
routing, usage report) as the SDK's in-memory exporter records it, joined to the client's ``traceparent``, carried
over handle calls that share no context, and with no prompt or completion text anywhere in it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from deployments.tokenizer import TokenizerCore, TokenizerSpec
from observability import tracing
from testkit.doubles import InstantEngineDouble
from testkit.sse import parse_events
from tests.inprocess import CTX, InProcessStack, inprocess_stack

CANARY = "Kanariefuglen synger om Øresund"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    trace.set_tracer_provider(provider)  # this test process's only provider
    yield memory


@pytest.fixture
async def stack(tiny_models: dict[str, Path], tmp_path: Path) -> AsyncIterator[InProcessStack]:
    core = TokenizerCore([TokenizerSpec(n, p, CTX) for n, p in tiny_models.items()], block_size=16)
    engines = {"qwen3-next-tiny": InstantEngineDouble()}
    async with inprocess_stack(core, tmp_path, engines, tokenizer_deployment=True) as s:
        yield s


def by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    return {s.name: s for s in spans}


async def test_a_streaming_request_is_one_trace_with_every_stage(
    stack: InProcessStack, exporter: InMemorySpanExporter
) -> None:
    key = stack.key("t")
    exporter.clear()
    body = {
        "model": "qwen3-next-tiny",
        "messages": [{"role": "user", "content": CANARY}],
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = await stack.client.post(
        "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}", "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
    )
    assert r.status_code == 200
    usage = parse_events(r.content)[-2]["usage"]
    spans = by_name(exporter.get_finished_spans())
    server = spans["POST /v1/chat/completions"]
    assert server.kind == trace.SpanKind.SERVER
    assert format(server.context.trace_id, "032x") == TRACE_ID  # the client's trace is honoured
    assert server.parent is not None and format(server.parent.span_id, "016x") == PARENT_ID
    expected_parents = {
        "tokenizer.prepare": "POST /v1/chat/completions",
        "admission": "POST /v1/chat/completions",
        "billing.admit": "admission",
        "engine.route": "POST /v1/chat/completions",
        "billing.usage_report": "POST /v1/chat/completions",
    }
    for name, parent in expected_parents.items():
        assert name in spans, f"no {name} span: {sorted(spans)}"
        assert spans[name].context.trace_id == server.context.trace_id
        assert spans[name].parent is not None and spans[name].parent.span_id == spans[parent].context.span_id, name
    assert server.attributes is not None
    assert (
        server.attributes["http.response.status_code"] == 200
        and server.attributes["url.path"] == "/v1/chat/completions"
    )
    assert server.attributes["anker.completion_tokens"] == usage["completion_tokens"] == 4
    assert server.attributes["anker.prompt_tokens"] == usage["prompt_tokens"]
    assert spans["tokenizer.prepare"].attributes["anker.prompt_tokens"] == usage["prompt_tokens"]  # type: ignore[index]
    # Zero data retention: no span name or attribute carries the prompt, or the completion the double produced.
    for s in exporter.get_finished_spans():
        text = s.name + repr(dict(s.attributes or {}))
        assert CANARY not in text and "Kanariefuglen" not in text and "t0t1" not in text


async def test_an_error_is_a_status_with_a_code_never_a_message(
    stack: InProcessStack, exporter: InMemorySpanExporter
) -> None:
    key = stack.key("t")
    exporter.clear()
    too_long = {"model": "qwen3-next-tiny", "messages": [{"role": "user", "content": CANARY * 200}]}
    r = await stack.client.post("/v1/chat/completions", json=too_long, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 400
    spans = by_name(exporter.get_finished_spans())
    assert spans["tokenizer.prepare"].attributes["anker.error_code"] == "context_length_exceeded"  # type: ignore[index]
    assert spans["POST /v1/chat/completions"].attributes["http.response.status_code"] == 400  # type: ignore[index]
    for s in exporter.get_finished_spans():
        assert CANARY not in (s.status.description or "") and CANARY not in repr(dict(s.attributes or {}))


def test_attributes_outside_the_allow_list_are_refused() -> None:
    with pytest.raises(ValueError):
        tracing.checked({"prompt": "hej"})
    with pytest.raises(ValueError):
        tracing.checked({"anker.model": "x" * 500})
    assert tracing.checked({"anker.model": "m", "anker.n": None}) == {"anker.model": "m"}


@pytest.mark.parametrize(
    ("header", "kept"),
    [
        (b"5a0e0bd7-2f0e-4c2b-a7d4-0e5b7c1e9f11", "5a0e0bd7-2f0e-4c2b-a7d4-0e5b7c1e9f11"),
        (b"req_01:abc.def", "req_01:abc.def"),
        (CANARY.encode(), ""),  # a header a client wrote as text is not an id, and is not kept
        (b"x" * 65, ""),
        (b"", ""),
    ],
)
def test_only_an_id_shaped_request_id_is_kept(header: bytes, kept: str) -> None:
    assert tracing.request_id({"headers": [(b"x-request-id", header)]}) == kept
    assert tracing.request_id({"headers": []}) == ""
