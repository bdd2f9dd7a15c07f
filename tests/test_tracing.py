"""Tracing in-process: the span tree of a streaming request on an engine replica over a real vLLM (the door's
server span, admission below it, the billing actor's span below that, reached through a handle call that shares no
context), joined to the client's ``traceparent``, with the request's counts on it and no prompt or completion text
anywhere in it; errors as a status with a code, never a message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from observability import tracing
from testkit.sse import parse_events
from tests.inprocess import (
    REPLICA_ID,
    REPLICA_MODEL,
    InProcessReplica,
    ServingLayer,
    inprocess_replica,
    serving_layer,
)

CANARY = "Kanariefuglen synger om Øresund"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
SERVER_SPAN = "POST /v1/chat/completions"


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    trace.set_tracer_provider(provider)  # this test process's only provider
    yield memory


@pytest.fixture(scope="module")
async def serving(tiny_models: dict[str, Path], vllm_cpu_env: None) -> AsyncIterator[ServingLayer]:
    async with serving_layer(tiny_models[REPLICA_MODEL]) as layer:
        yield layer


@pytest.fixture
async def replica(
    serving: ServingLayer, tmp_path: Path, exporter: InMemorySpanExporter
) -> AsyncIterator[InProcessReplica]:
    async with inprocess_replica(serving, tmp_path) as r:
        exporter.clear()
        yield r


def by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    return {s.name: s for s in spans}


def chat(content: str, **extra: object) -> dict[str, object]:
    return {
        "model": REPLICA_MODEL,
        "messages": [{"role": "user", "content": content}],
        "chat_template_kwargs": {"enable_thinking": False},
        **extra,
    }


def assert_no_text(spans: tuple[ReadableSpan, ...], *texts: str) -> None:
    """Zero data retention: no span's name, attributes, status or events carry any of ``texts``."""
    for s in spans:
        kept = s.name + repr(dict(s.attributes or {})) + (s.status.description or "")
        kept += repr([(e.name, dict(e.attributes or {})) for e in s.events])
        for text in texts:
            assert text not in kept, (s.name, text)


async def test_a_streaming_request_is_one_trace_with_every_stage(
    replica: InProcessReplica, exporter: InMemorySpanExporter
) -> None:
    key = replica.key("t")
    body = chat(CANARY, max_tokens=12, stream=True, stream_options={"include_usage": True})
    headers = {"Authorization": f"Bearer {key}", "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
    r = await replica.client.post("/v1/chat/completions", json=body, headers=headers)
    assert r.status_code == 200
    events = parse_events(r.content)
    usage = events[-2]["usage"]
    completion = "".join(
        choice["delta"].get("content") or ""
        for event in events[:-1]
        if isinstance(event, dict)
        for choice in event.get("choices", ())
    )
    spans = by_name(exporter.get_finished_spans())
    server = spans[SERVER_SPAN]
    assert server.kind == trace.SpanKind.SERVER
    assert format(server.context.trace_id, "032x") == TRACE_ID  # the client's trace is honoured
    assert server.parent is not None and format(server.parent.span_id, "016x") == PARENT_ID
    # The key's first request: its replica holds nothing of the key yet, so admission asks billing for a lease.
    for name, parent in {"admission": SERVER_SPAN, "billing.lease": "admission"}.items():
        assert name in spans, f"no {name} span: {sorted(spans)}"
        assert spans[name].context.trace_id == server.context.trace_id
        assert spans[name].parent is not None and spans[name].parent.span_id == spans[parent].context.span_id, name
    assert spans["admission"].kind == trace.SpanKind.CLIENT and spans["billing.lease"].kind == trace.SpanKind.SERVER
    attributes = dict(server.attributes or {})
    assert attributes["http.response.status_code"] == 200 and attributes["url.path"] == "/v1/chat/completions"
    assert attributes["anker.model"] == REPLICA_MODEL and attributes["anker.engine_replica"] == REPLICA_ID
    assert attributes["anker.completion_tokens"] == usage["completion_tokens"] > 0
    assert attributes["anker.prompt_tokens"] == usage["prompt_tokens"]
    assert server.status.status_code == trace.StatusCode.UNSET
    # The admission's billing id is the ledger's: the trace finds the row, the row never holds the trace.
    (row,) = await replica.ledger("t")
    assert (
        spans["admission"].attributes is not None
        and spans["admission"].attributes["anker.billing_id"] == row["request_id"]
    )
    texts = [CANARY, "Kanariefuglen", "Øresund"] + ([completion] if len(completion) >= 8 else [])
    assert_no_text(exporter.get_finished_spans(), *texts)
    # The next request is admitted from what the replica holds: no call to billing, no billing span.
    exporter.clear()
    r = await replica.client.post("/v1/chat/completions", json=chat(CANARY, max_tokens=2), headers=headers)
    assert r.status_code == 200
    names = [s.name for s in exporter.get_finished_spans()]
    assert "admission" in names and "billing.lease" not in names, names


async def test_a_refusal_is_an_error_status_with_a_code_never_a_message(
    replica: InProcessReplica, exporter: InMemorySpanExporter
) -> None:
    broke = replica.key("broke", budget_dkk="0")
    r = await replica.client.post(
        "/v1/chat/completions", json=chat(CANARY, max_tokens=4), headers={"Authorization": f"Bearer {broke}"}
    )
    assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"
    spans = by_name(exporter.get_finished_spans())
    for name in ("admission", "billing.lease"):
        assert spans[name].status.status_code == trace.StatusCode.ERROR, name
        assert spans[name].status.description == "InsufficientQuota", name  # the error's type, not its message
        assert spans[name].attributes is not None and spans[name].attributes["anker.error_code"] == "insufficient_quota"
    assert spans[SERVER_SPAN].attributes is not None
    assert spans[SERVER_SPAN].attributes["http.response.status_code"] == 429
    assert_no_text(exporter.get_finished_spans(), CANARY, r.json()["error"]["message"])


async def test_a_clients_mistake_is_a_status_and_keeps_no_text(
    replica: InProcessReplica, exporter: InMemorySpanExporter
) -> None:
    key = replica.key("t")
    too_long = chat(CANARY * 400, max_tokens=4)
    r = await replica.client.post("/v1/chat/completions", json=too_long, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    spans = exporter.get_finished_spans()
    server = by_name(spans)[SERVER_SPAN]
    assert server.attributes is not None and server.attributes["http.response.status_code"] == 400
    assert "admission" not in by_name(spans)  # refused before the engine: nothing was admitted or billed
    assert_no_text(spans, CANARY, "Kanariefuglen")


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
