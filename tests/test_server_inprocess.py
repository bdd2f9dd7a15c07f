"""The engine replica's own HTTP app (deployments/server/) over a real vLLM on the tiny Qwen3-MoE, called with the
official ``openai`` SDK in process: tools, structured outputs, reasoning, the Responses API, the parameter
allow-list, zero-data-retention errors, and metering equal to the usage the client was told.

One engine for the module (about 20 s to start). Random weights: assertions are about shapes, schemas and counts,
never about what the text says.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import openai
import pytest
import uvicorn
from openai.types.chat import ChatCompletion
from openai.types.shared import Reasoning
from pydantic import BaseModel

from deployments.billing.actor import Billing
from deployments.billing.client import ServeBillingClient
from deployments.billing.governance import Actor
from deployments.billing.service import BillingService, BillingSpec
from deployments.server.app import create_server_app
from deployments.server.gate import Call, KeyGate
from deployments.server.metering import Metered
from deployments.server.vllm_start import SERVE_LOGGER
from deployments.usage_outbox import Spool
from testkit.doubles import InProcessHandleDouble, ScriptedOutputEngineDouble
from testkit.ports import free_port
from tests.inprocess import DEADLINES, PRICES, ServingLayer, serving_layer

MODEL = "qwen3-moe-tiny"
BODY_LIMIT = 64 * 1024
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a Danish city for some days.",
        "strict": True,  # arguments that follow the schema, as OpenAI's strict tools do
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Aarhus", "Odense", "Aalborg"]},
                "days": {"type": "integer", "enum": [1, 2, 3]},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
# For the grammar-forced calls: integers and booleans. Qwen's XML call format carries each argument as text, and
# its grammar lets whitespace stand around a value; random weights pad string values with it (a trained model writes
# one newline, which the parser strips), so strings would test the model, not the platform.
ALARM = {
    "type": "function",
    "function": {
        "name": "set_alarm",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {"hour": {"type": "integer", "enum": [6, 7, 8]}, "loud": {"type": "boolean"}},
            "required": ["hour", "loud"],
            "additionalProperties": False,
        },
    },
}
QUESTION = [{"role": "user", "content": "Hvordan bliver vejret i Aarhus i morgen?"}]


class Weather(BaseModel):
    city: Literal["Aarhus", "Odense"]
    days: Literal[1, 2, 3]


class Server:
    def __init__(
        self,
        client: openai.AsyncOpenAI,
        http: httpx.AsyncClient,
        reports: list[tuple[str, Metered]],
        billing: BillingService,
        accounts: ServeBillingClient,
        scripted: ScriptedOutputEngineDouble,
    ) -> None:
        self.client, self.http, self.reports = client, http, reports
        self.billing, self.accounts = billing, accounts
        self.scripted = scripted

    @contextlib.contextmanager
    def engine_writes(self, script: str) -> Iterator[None]:
        """The engine's (final) output says ``script`` while inside (testkit/doubles.py)."""
        self.scripted.script = script
        try:
            yield
        finally:
            self.scripted.script = None

    def key(self, tenant: str, **settings: Any) -> str:
        """A new key made by the operator (``role``, ``allowed_models``, ``budget_dkk``, …)."""
        _, key = self.billing.governance.create_key(Actor.operator("test"), tenant, **settings)
        return key

    async def ledger(self, tenant: str) -> list[dict[str, Any]]:
        """The tenant's ledger rows, once the replica's outbox has handed every usage report to billing."""
        assert await self.accounts.outbox.drain(timeout_s=10.0), "usage reports were not acknowledged"
        return list(self.billing.ledger.events(tenant))

    async def report(self, path: str, since: int, timeout_s: float = 30) -> Metered:
        """The one usage report of a request to ``path`` made after ``since`` reports. The server reports when the
        request has ended on its side, which may be just after the client has its answer: so this waits for it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not (found := [metered for where, metered in self.reports[since:] if where == path]):
            assert loop.time() < deadline, f"no usage report for {path} within {timeout_s:g} s: {self.reports[since:]}"
            await asyncio.sleep(0.05)
        assert len(found) == 1, f"more than one usage report for one request to {path}: {found}"
        return found[0]


@pytest.fixture(scope="module")
async def layer(tiny_models: dict[str, Path], vllm_cpu_env: None) -> AsyncIterator[ServingLayer]:
    async with serving_layer(tiny_models[MODEL]) as serving:
        yield serving


@pytest.fixture(scope="module")
async def server(layer: ServingLayer, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Server]:
    # The billing deployment's own class on a real SQLite ledger, reached as the replica reaches it (its handle
    # replaced by a double that calls it in this process).
    actor = Billing.func_or_class(
        BillingSpec(tmp_path_factory.mktemp("billing"), None, {MODEL: PRICES}, default_rpm=600, default_tpm=2_000_000)
    )
    accounts = ServeBillingClient(
        InProcessHandleDouble(actor),  # type: ignore[arg-type]
        key_cache_ttl_s=0.0,
        flush_interval_s=0.05,
        spool_dir=tmp_path_factory.mktemp("spool"),  # as a replica has: its streams' progress goes there too
    )
    outbox = asyncio.create_task(accounts.outbox.run())
    reports: list[tuple[str, Metered]] = []
    cards = [{"id": MODEL, "object": "model", "created": 0, "owned_by": "anker"}]

    def report(call: Call, metered: Metered) -> None:
        reports.append((call.path, metered))

    served = create_server_app(layer.layer.state, MODEL, cards, BODY_LIMIT)
    app = KeyGate(served, accounts, MODEL, "dk", report, deadlines=DEADLINES)
    billing: BillingService = actor._service
    _, key = billing.governance.create_key(Actor.operator("test"), "tests")
    # A real HTTP server on loopback: streams arrive as they are sent, and a client can leave mid-stream.
    port = free_port()
    http_server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    )
    serving = asyncio.create_task(http_server.serve())
    try:
        while not http_server.started:
            assert not serving.done(), "the HTTP server did not start"
            await asyncio.sleep(0.05)
        base = f"http://127.0.0.1:{port}"
        keyed = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=base, timeout=120, headers=keyed) as http:
            client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key, http_client=http, max_retries=0)
            yield Server(client, http, reports, billing, accounts, layer.scripted)
    finally:
        http_server.should_exit = True
        await serving
        outbox.cancel()
        actor._sweeper.cancel()
        billing.ledger.dispose()


def assert_alarm_arguments(arguments: str) -> None:
    parsed = json.loads(arguments)
    assert set(parsed) == {"hour", "loud"}, parsed
    assert parsed["hour"] in {6, 7, 8} and isinstance(parsed["loud"], bool), parsed


async def ask_with_tools(server: Server, choice: Any, max_tokens: int) -> ChatCompletion:
    """The question, with both tools offered and ``choice`` as the tool choice, thinking off."""
    return await server.client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        tools=[WEATHER, ALARM],
        tool_choice=choice,
        max_tokens=max_tokens,
        extra_body=NO_THINKING,
    )


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "set_alarm"}}])
async def test_a_required_or_named_tool_choice_yields_a_schema_valid_call(server: Server, choice: Any) -> None:
    answer = await ask_with_tools(server, choice, max_tokens=120)
    message = answer.choices[0].message
    assert message.tool_calls, answer
    for call in message.tool_calls:
        assert call.function.name in ("set_alarm", "get_weather"), call
        if choice != "required":
            assert call.function.name == "set_alarm"
        if call.function.name == "set_alarm":
            assert_alarm_arguments(call.function.arguments)
        else:
            assert set(json.loads(call.function.arguments)) == {"city", "days"}
    # Random weights run on after the call until max_tokens; a trained model stops (tool_calls).
    assert answer.choices[0].finish_reason in ("tool_calls", "length")


CALL_TEXT = (
    "Jeg ser efter.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nAarhus\n</parameter>\n"
    "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>"
)


async def test_auto_tool_choice_reads_a_call_the_model_writes(server: Server) -> None:
    """``auto`` leaves the choice to the model: vLLM's ``qwen3_coder`` parser finds the call in what it wrote (Qwen's
    XML form, as the tiny models' template asks for it) and types its arguments by the tool's schema."""
    with server.engine_writes(CALL_TEXT):
        answer, plain = [await ask_with_tools(server, choice, max_tokens=4) for choice in ("auto", "none")]
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content == "Jeg ser efter."
    [call] = choice.message.tool_calls or []
    assert call.type == "function" and call.id
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Aarhus", "days": 2})
    # With `none` no call is made of the same text (vLLM's parser drops the call's markup from the content).
    assert plain.choices[0].message.tool_calls in (None, []) and plain.choices[0].finish_reason == "stop"
    assert (plain.choices[0].message.content or "").startswith("Jeg ser efter.")


async def test_tool_calls_stream_as_deltas_and_finish_with_tool_calls(server: Server) -> None:
    since = len(server.reports)
    stream = await server.client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        tools=[ALARM],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=120,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=NO_THINKING,
    )
    names, arguments, finish, usage = [], "", None, None
    async for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for call in choice.delta.tool_calls or ():
                names += [call.function.name] if call.function and call.function.name else []
                arguments += call.function.arguments or "" if call.function else ""
    assert names == ["set_alarm"] and finish in ("tool_calls", "length")
    assert_alarm_arguments(arguments)
    metered = await server.report("/v1/chat/completions", since)
    assert usage is not None and usage.completion_tokens == metered.output_tokens


async def test_history_with_tool_calls_and_tool_turns_is_accepted(server: Server) -> None:
    history = [
        *QUESTION,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Aarhus", "days": 1}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature_c": 4, "sky": "overskyet"}'},
    ]
    answer = await server.client.chat.completions.create(
        model=MODEL, messages=history, tools=[WEATHER], tool_choice="none", max_tokens=8, extra_body=NO_THINKING
    )
    assert answer.choices[0].message.tool_calls in (None, [])
    assert answer.usage is not None and answer.usage.completion_tokens >= 1


async def test_structured_outputs_parse_into_the_clients_model(server: Server) -> None:
    answer = await server.client.chat.completions.parse(
        model=MODEL, messages=QUESTION, response_format=Weather, max_tokens=60, extra_body=NO_THINKING
    )
    parsed = answer.choices[0].message.parsed
    assert isinstance(parsed, Weather), answer.choices[0].message
    raw = await server.client.chat.completions.create(
        model=MODEL, messages=QUESTION, response_format={"type": "json_object"}, max_tokens=40, extra_body=NO_THINKING
    )
    if raw.choices[0].finish_reason == "stop":  # a random model may run out of tokens inside the object
        assert isinstance(json.loads(raw.choices[0].message.content or ""), dict)


async def test_reasoning_is_split_from_content_and_counted(server: Server) -> None:
    thinking = await server.client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12)
    # The template opens no <think> block and random weights never close one: the qwen3 parser reads it all as
    # reasoning, and the usage says so; asked not to think, all of it is content.
    details = thinking.usage.completion_tokens_details if thinking.usage else None
    assert details is not None and details.reasoning_tokens == thinking.usage.completion_tokens  # type: ignore[union-attr]
    assert thinking.choices[0].message.content in (None, "")
    plain = await server.client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=12, extra_body=NO_THINKING
    )
    assert plain.choices[0].message.content
    assert plain.usage and plain.usage.completion_tokens_details
    assert plain.usage.completion_tokens_details.reasoning_tokens == 0


async def test_the_responses_api_answers_plain_and_streamed_and_stores_nothing(server: Server) -> None:
    since = len(server.reports)
    response = await server.client.responses.create(model=MODEL, input="Hej", max_output_tokens=16)
    assert response.usage is not None and response.usage.output_tokens == 16
    assert (await server.report("/v1/responses", since)).output_tokens == response.usage.output_tokens
    async with server.client.responses.stream(model=MODEL, input="Hej igen", max_output_tokens=8) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    assert final.usage is not None and final.usage.output_tokens == 8
    with pytest.raises(openai.NotFoundError) as fetched:
        await server.client.responses.retrieve(response.id)
    assert "zero data retention" in str(fetched.value)
    with pytest.raises(openai.BadRequestError) as continued:
        await server.client.responses.create(
            model=MODEL, input="Og så?", previous_response_id=response.id, max_output_tokens=4
        )
    assert continued.value.param == "previous_response_id"


async def test_usage_reports_cached_tokens_and_the_meter_agrees(server: Server) -> None:
    prompt = [{"role": "user", "content": " ".join(f"linje {i}: Ræven løb over broen." for i in range(40))}]
    first = await server.client.chat.completions.create(model=MODEL, messages=prompt, max_tokens=2)
    since = len(server.reports)
    again = await server.client.chat.completions.create(model=MODEL, messages=prompt, max_tokens=2)
    assert first.usage and first.usage.prompt_tokens_details and again.usage and again.usage.prompt_tokens_details
    cached = again.usage.prompt_tokens_details.cached_tokens or 0
    assert cached > 0, again.usage
    metered = await server.report("/v1/chat/completions", since)
    assert (metered.prompt_tokens, metered.cached_tokens, metered.output_tokens) == (
        again.usage.prompt_tokens,
        cached,
        again.usage.completion_tokens,
    )
    assert metered.finished and metered.generations == 1


async def test_a_stream_the_client_leaves_is_metered_for_what_it_produced(server: Server) -> None:
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 400, "stream": True, **NO_THINKING}
    before = len(server.reports)
    async with server.http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                break  # leave after the first chunk
    # The server sees the client go at its next send, aborts the generation and reports what it produced.
    metered = await server.report("/v1/chat/completions", before)
    assert not metered.finished and 1 <= metered.output_tokens < 400 and metered.prompt_tokens > 0


async def test_two_organisations_sending_one_request_id_never_touch_each_others_streams(server: Server) -> None:
    """A client's ``X-Request-Id`` is for correlation only, never the engine's request id: two organisations stream
    with the same one at once, one leaves mid-stream, and the other's stream still finishes, billed under an id the
    door made, which is also its answer's id."""
    staying, leaving = server.key("same-id-staying"), server.key("same-id-leaving")
    body = {
        "model": MODEL,
        "messages": QUESTION,
        "max_tokens": 120,
        "stream": True,
        "stream_options": {"include_usage": True},
        **NO_THINKING,
    }

    def headers(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}", "X-Request-Id": "kunde-ordre-4711"}

    started = asyncio.Event()

    async def stay() -> list[Any]:
        events: list[Any] = []
        async with server.http.stream("POST", "/v1/chat/completions", json=body, headers=headers(staying)) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
                    started.set()
        return events

    staying_stream = asyncio.create_task(stay())
    await asyncio.wait_for(started.wait(), 60)
    async with server.http.stream("POST", "/v1/chat/completions", json=body, headers=headers(leaving)) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                break  # leaves after its first chunk, while the other stream runs
    events = await staying_stream
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] > 0, events[-3:]
    [row] = await server.ledger("same-id-staying")
    assert row["status"] == "ok" and row["completion_tokens"] == events[-2]["usage"]["completion_tokens"]
    assert {e["id"] for e in events[:-1]} == {row["request_id"]}  # the answer's id is the ledger's, not the client's


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
async def test_a_client_that_leaves_before_its_first_token_pays_for_its_prompt(server: Server, stream: bool) -> None:
    """Issue 15, hole 4: a prompt the engine was given is processed (and its prefix cached) whether or not the
    client waits for an output, so leaving just before the first token must not make a long prompt free. The
    client's leaving ends the engine's work at once, as vLLM's own server does; the engine reports cache hits with
    its first output only, so the prompt is billed uncached."""
    tenant = f"leaves-before-first-token-{stream}"
    key = server.key(tenant)
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 8, "stream": stream, **NO_THINKING}
    since = len(server.reports)

    async def leave_early() -> None:
        headers = {"Authorization": f"Bearer {key}"}
        async with server.http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
            async for _ in r.aiter_lines():
                raise AssertionError("an output came through the hold")

    server.scripted.hold = asyncio.Event()
    try:
        leaving = asyncio.create_task(leave_early())
        async with asyncio.timeout(60):
            while not server.scripted.held:  # the engine has the prompt; its first output waits
                await asyncio.sleep(0.02)
        leaving.cancel()  # the client leaves: its connection closes
        with contextlib.suppress(asyncio.CancelledError):
            await leaving
        metered = await server.report("/v1/chat/completions", since)
    finally:
        server.scripted.hold.set()
        server.scripted.hold = None
    assert metered.prompt_tokens > 0 and metered.output_tokens == 0 and not metered.finished, metered
    [row] = await server.ledger(tenant)
    assert (row["status"], row["prompt_tokens"], row["completion_tokens"]) == ("cancelled", metered.prompt_tokens, 0)
    assert row["cost_nano_dkk"] == metered.prompt_tokens * PRICES.input_uncached_nano_dkk > 0


async def test_a_stream_leaves_its_progress_where_a_dead_replicas_adopter_finds_it(
    server: Server, tmp_path: Path
) -> None:
    """Issue 15, hole 9: from its first chunk on, a stream's progress (prompt, cached and output tokens sent so far)
    is in the replica's spool, so a replica that dies mid-stream leaves its usage behind. Here the spool is read as
    it was just before the stream's report: the adopter bills the stream as the service's failure, for its prompt
    and at most what it was sent."""
    key = server.key("progress-in-the-spool")
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 24, "stream": True, **NO_THINKING}
    body["stream_options"] = {"include_usage": True}
    events = []
    async with server.http.stream(
        "POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
    usage = events[-1]["usage"]
    billing_id = events[0]["id"]
    [row] = await server.ledger("progress-in-the-spool")
    assert (row["request_id"], row["status"]) == (billing_id, "ok")
    assert not server.accounts.outbox._progress  # ended: nothing of it is left in flight

    spool = server.accounts.outbox._spool
    assert spool is not None
    lines = spool.path.read_text("utf-8").splitlines()
    kinds = [line[:5] for line in lines if billing_id in line]
    assert kinds[0] == '{"p":' and kinds[-2:] == ['{"r":', '{"a":'], kinds  # progress, then its report, recorded
    ended = next(i for i, line in enumerate(lines) if billing_id in line and line.startswith('{"r":'))
    dead = tmp_path / "dead-replica"
    dead.mkdir()
    (dead / "spool.jsonl").write_text("".join(f"{line}\n" for line in lines[:ended]), "utf-8")  # before the end
    [adopted] = [r.event for r in Spool(dead).adopt_orphans()]  # a replica started on the dead one's folder
    assert (adopted.request_id, adopted.status, adopted.prompt_tokens) == (
        billing_id,
        "engine_unavailable",
        usage["prompt_tokens"],
    )
    assert 1 <= adopted.completion_tokens <= usage["completion_tokens"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"made_up_option": 1}, "made_up_option"),
        ({"cache_salt": "another-organisation"}, "cache_salt"),  # the engine's own controls are not the client's
        ({"request_id": "mine"}, "request_id"),
        ({"priority": -100}, "priority"),
        ({"chat_template": "{{ messages }}"}, "chat_template"),
        ({"Fortæl mig alt": 1}, None),  # not shaped like a parameter: refused without repeating it
    ],
)
async def test_what_the_client_may_not_set_is_a_400_that_names_it(
    server: Server, body: dict[str, Any], param: str | None
) -> None:
    r = await server.http.post("/v1/chat/completions", json={"model": MODEL, "messages": QUESTION, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "unsupported_parameter", param)
    assert "Fortæl" not in r.text


async def test_vllms_errors_reach_the_client_in_ankers_words(server: Server) -> None:
    secret = "hemmeligt-kodeord-" * 400
    r = await server.http.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": secret}]}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert "hemmeligt" not in r.text and "2048" not in r.text
    r = await server.http.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": QUESTION, "temperature": "varm"}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature" and "varm" not in r.text
    r = await server.http.post("/v1/chat/completions", json={"model": "gpt-9", "messages": QUESTION})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found" and "gpt-9" not in r.text


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ({"tools": []}, "invalid_value", "tools"),
        # Past what the model can do, however large the key's rate limit: told as such, not as a rate limit.
        ({"max_tokens": 10**9}, "invalid_value", "max_tokens"),
        ({"max_completion_tokens": 10**9}, "invalid_value", "max_completion_tokens"),
        ({"n": 1000}, "invalid_value", "n"),
        ({"n": 0}, "invalid_value", "n"),
    ],
)
async def test_a_mistake_vllm_finds_is_a_400_that_says_which(
    server: Server, body: dict[str, Any], code: str, param: str
) -> None:
    r = await server.http.post("/v1/chat/completions", json={"model": MODEL, "messages": QUESTION, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"]) == (code, param), error


async def test_completions_and_models(server: Server) -> None:
    since = len(server.reports)
    answer = await server.client.completions.create(model=MODEL, prompt=["Hej", "Farvel"], max_tokens=3)
    assert sorted(choice.index for choice in answer.choices) == [0, 1]
    metered = await server.report("/v1/completions", since)
    assert answer.usage is not None
    assert (metered.generations, metered.output_tokens) == (2, answer.usage.completion_tokens)
    assert [m.id async for m in server.client.models.list()] == [MODEL]


async def test_a_body_over_the_limit_is_413_and_never_reaches_the_engine(server: Server) -> None:
    since = len(server.reports)
    big = [{"role": "user", "content": "ord " * (BODY_LIMIT // 4)}]
    r = await server.http.post("/v1/chat/completions", json={"model": MODEL, "messages": big})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
    metered = await server.report("/v1/chat/completions", since)
    assert (metered.generations, metered.prompt_tokens, metered.output_tokens) == (0, 0, 0)


async def test_each_organisation_has_its_own_prefix_cache(server: Server) -> None:
    prompt = [{"role": "user", "content": " ".join(f"linje {i}: Ørnen fløj over fjorden." for i in range(40))}]

    async def cached(key: str) -> int:
        client = server.client.with_options(api_key=key)
        answer = await client.chat.completions.create(model=MODEL, messages=prompt, max_tokens=2)  # type: ignore[arg-type]
        assert answer.usage and answer.usage.prompt_tokens_details
        return answer.usage.prompt_tokens_details.cached_tokens or 0

    first, second = server.key("salt-a"), server.key("salt-b")
    assert await cached(first) == 0
    assert await cached(second) == 0  # the same prompt from another organisation misses
    assert await cached(first) > 0  # and hits for its own


RATE_HEADERS = {"x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-limit-tokens"}


async def test_a_call_needs_a_key_that_may_call_this_model(server: Server) -> None:
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 2}
    viewer = server.key("doors", role="viewer")
    elsewhere = server.key("doors", allowed_models=["qwen3-next-tiny"])
    since = len(server.reports)
    for headers, status, code in (
        ({"Authorization": ""}, 401, "invalid_api_key"),
        ({"Authorization": "Bearer sk-anker-not-a-key"}, 401, "invalid_api_key"),
        ({"Authorization": f"Bearer {viewer}"}, 403, "permission_denied"),
        ({"Authorization": f"Bearer {elsewhere}"}, 403, "model_not_allowed"),
    ):
        r = await server.http.post("/v1/chat/completions", json=body, headers=headers)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
    r = await server.http.get("/v1/models", headers={"Authorization": "Bearer sk-anker-not-a-key"})
    assert r.status_code == 401, r.text
    r = await server.http.post("/v1/chat/completions", content=b"{bad", headers={"Authorization": ""})  # key first
    assert (r.status_code, r.json()["error"]["code"]) == (401, "invalid_api_key"), r.text
    # Turned away at the door: nothing metered, nothing billed.
    assert server.reports[since:] == []
    assert await server.ledger("doors") == []


async def test_the_ledger_holds_what_each_client_was_told_once(server: Server) -> None:
    key = server.key("ledger")
    client = server.client.with_options(api_key=key)
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=QUESTION, max_tokens=6, extra_body=NO_THINKING
    )
    assert set(raw.headers) >= RATE_HEADERS
    chat = raw.parse()
    stream = await client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=5, stream=True, stream_options={"include_usage": True}
    )
    streamed = [chunk async for chunk in stream][-1].usage
    batch = await client.completions.create(model=MODEL, prompt=["Hej", "Farvel med dig"], max_tokens=3)
    response = await client.responses.create(model=MODEL, input="Hej", max_output_tokens=4)
    assert chat.usage and streamed and batch.usage and response.usage
    told = sorted(
        [
            (chat.usage.prompt_tokens, chat.usage.completion_tokens),
            (streamed.prompt_tokens, streamed.completion_tokens),
            (batch.usage.prompt_tokens, batch.usage.completion_tokens),
            (response.usage.input_tokens, response.usage.output_tokens),
        ]
    )
    rows = await server.ledger("ledger")
    assert sorted((row["prompt_tokens"], row["completion_tokens"]) for row in rows) == told
    assert len({row["request_id"] for row in rows}) == 4 and {row["status"] for row in rows} == {"ok"}
    assert {row["request_id"].split("-")[0] for row in rows} == {"chatcmpl", "cmpl", "resp"}


async def test_a_used_up_budget_is_429_before_the_stream_starts_and_the_engine_never_runs(server: Server) -> None:
    key = server.key("broke", budget_dkk="0")
    client = server.client.with_options(api_key=key)
    since = len(server.reports)
    with pytest.raises(openai.RateLimitError) as streamed:
        await client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, stream=True)
    with pytest.raises(openai.RateLimitError) as plain:
        await client.responses.create(model=MODEL, input="Hej", max_output_tokens=4)
    for refused in (streamed.value, plain.value):
        assert refused.code == "insufficient_quota" and set(refused.response.headers) >= RATE_HEADERS
    metered = [m for _, m in server.reports[since:]]
    assert len(metered) == 2 and all(m.generations == 0 and not m.admitted for m in metered), metered
    assert await server.ledger("broke") == []


# -- real clients ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("api", ["responses", "chat_completions"])
async def test_the_agents_sdk_runs_a_function_tool(server: Server, api: str) -> None:
    """The OpenAI Agents SDK over both its models: a forced call of a strict function tool, which the agent runs
    with schema-valid arguments; the run stops on that tool (``stop_on_first_tool``), so its turns are bounded."""
    import agents

    agents.set_tracing_disabled(True)  # the SDK would export traces to OpenAI: zero data retention
    calls: list[tuple[int, bool]] = []

    @agents.function_tool
    def set_alarm(hour: Literal[6, 7, 8], loud: bool) -> str:
        """Set the alarm clock."""
        calls.append((hour, loud))
        return f"alarm at {hour}"

    model: agents.Model = (
        agents.OpenAIResponsesModel(MODEL, server.client)
        if api == "responses"
        else agents.OpenAIChatCompletionsModel(MODEL, server.client)
    )
    agent = agents.Agent(
        name="alarm",
        instructions="Set the alarm the user asks for.",
        tools=[set_alarm],
        model=model,
        # No thinking (random weights never end it, and a call's grammar applies after it). One call, so that the
        # grammar ends the answer after it: random weights would run on to max_tokens, which the SDK takes for a
        # failed response. Room for Qwen's XML call, around whose values random weights write whitespace (about
        # 220 tokens for this one).
        model_settings=agents.ModelSettings(
            tool_choice="required", parallel_tool_calls=False, max_tokens=400, reasoning=Reasoning(effort="none")
        ),
        tool_use_behavior="stop_on_first_tool",
    )
    result = await agents.Runner.run(agent, "Væk mig klokken syv, højt.", max_turns=2)
    assert len(calls) >= 1 and all(hour in (6, 7, 8) and isinstance(loud, bool) for hour, loud in calls), calls
    assert result.final_output == f"alarm at {calls[0][0]}"


async def test_langchain_binds_tools_and_structures_output(server: Server) -> None:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def set_alarm(hour: Literal[6, 7, 8], loud: bool) -> str:
        """Set the alarm clock."""
        return f"alarm at {hour}"

    chat = ChatOpenAI(
        model=MODEL,
        base_url=str(server.client.base_url),
        api_key=server.client.api_key,  # type: ignore[arg-type]
        # Room for Qwen's XML call whatever whitespace random weights write around its values (as the Agents SDK's
        # test above): with 120, a call now and then ran out of tokens before its second parameter.
        max_tokens=400,
        max_retries=0,
        extra_body=NO_THINKING,
    )
    message = await chat.bind_tools([set_alarm], tool_choice="set_alarm", strict=True).ainvoke("Væk mig kl. 7")
    assert [call["name"] for call in message.tool_calls] == ["set_alarm"], message
    arguments = message.tool_calls[0]["args"]
    assert arguments["hour"] in (6, 7, 8) and isinstance(arguments["loud"], bool), arguments
    weather = await chat.with_structured_output(Weather, method="json_schema", strict=True).ainvoke(
        "Hvordan bliver vejret i Aarhus?"
    )
    assert isinstance(weather, Weather)


async def test_a_call_logs_no_usage_line_unless_the_config_asks(server: Server) -> None:
    """No access log on the hot path (issue 14): by default the door logs nothing of a call; its usage is in the
    ledger and its counts on its span. ``server.log_requests`` turns the line on (tests/test_bad_input.py reads
    it)."""
    lines: list[str] = []

    class Collector(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    serve_logger, collector = logging.getLogger(SERVE_LOGGER), Collector(logging.DEBUG)
    level = serve_logger.level
    serve_logger.addHandler(collector)
    serve_logger.setLevel(logging.DEBUG)
    since = len(server.reports)
    try:
        answer = await server.client.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=2, extra_body=NO_THINKING
        )
        await server.report("/v1/chat/completions", since)  # the call has ended on the server, its usage submitted
    finally:
        serve_logger.removeHandler(collector)
        serve_logger.setLevel(level)
    assert answer.usage is not None and answer.usage.completion_tokens == 2
    assert not [line for line in lines if line.startswith("usage ")], lines
