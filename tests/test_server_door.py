"""The engine replica's door (``deployments/server/gate.py``) and what it bills, over a real vLLM on the tiny
Qwen3-MoE: the ledger on SQLite and on PostgreSQL, budgets under concurrency, prepaid credit, rate limits and their
headers on every answer, allow-lists by model and region, ids no client can merge, a failure of ours that costs
nothing, and an engine that hangs. One engine for the module; each test its own billing and ledger.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from deployments.billing.governance import Actor
from deployments.server.metering import Deadlines
from testkit.sse import parse_events
from tests.inprocess import (
    REPLICA_MODEL,
    InProcessReplica,
    ServingLayer,
    inprocess_replica,
    serving_layer,
)

MODEL = REPLICA_MODEL
RATE_HEADERS = {
    f"x-ratelimit-{kind}-{what}" for kind in ("limit", "remaining", "reset") for what in ("requests", "tokens")
}
QUESTION = [{"role": "user", "content": "Hvad koster en rødgrød med fløde?"}]
T = TypeVar("T")
LOUD_S = 60.0  # what a test of the engine's deadlines may take at most: a failure is loud, not a hang


@pytest.fixture(scope="module")
async def serving(tiny_models: dict[str, Path], vllm_cpu_env: None) -> AsyncIterator[ServingLayer]:
    async with serving_layer(tiny_models[MODEL]) as layer:
        yield layer


@pytest.fixture
async def replica(serving: ServingLayer, tmp_path: Path) -> AsyncIterator[InProcessReplica]:
    async with inprocess_replica(serving, tmp_path) as r:
        yield r


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": QUESTION, "chat_template_kwargs": {"enable_thinking": False}, **extra}


def auth(key: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **headers}


def assert_error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error: dict[str, Any] = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    return error


async def test_a_made_up_key_costs_no_billing_call_and_a_revoked_one_a_single_call_however_often_it_comes(
    replica: InProcessReplica,
) -> None:
    from deployments.keys import TAG_DIGITS, checksummed, tag_key_of, tagged

    real = replica.key()
    calls = replica.handle.calls  # the billing handle double counts what the door asks of billing

    async def refused(key: str) -> None:
        r = await replica.client.post("/v1/chat/completions", json=chat(max_tokens=1), headers=auth(key))
        assert_error(r, 401, "invalid_api_key")

    typo = real[:-1] + ("B" if real[-1] == "A" else "A")
    body = real[:-TAG_DIGITS]
    made_up = (
        "not-a-key",  # no key's shape
        "ank_" + "x" * 67,
        real + "A",
        typo,  # a wrong tag
        tagged(body[:-1] + "Z", tag_key_of(b"a forger's secret, not billing's")),
        checksummed(body),  # of the shapes before tags, with an id of no such key
        body,
        checksummed("ank_0123456789ab_" + "C" * 43),
    )
    for key in made_up:
        await asyncio.gather(*(refused(key) for _ in range(5)))
    # Refused in process: billing was asked once for its key check, and never about a key.
    assert calls["authenticate"] == 0 and calls["key_check"] == 1
    ok = await replica.client.post("/v1/chat/completions", json=chat(max_tokens=1), headers=auth(real))
    assert ok.status_code == 200, ok.text
    assert calls["authenticate"] == 1
    # A revoked key passes the check (its tag is right): one look-up, shared by the requests that came at once,
    # remembered for the rest.
    revoked = replica.key()
    replica.service.keys.revoke(revoked.split("_")[1])
    await asyncio.gather(*(refused(revoked) for _ in range(10)))
    for _ in range(10):
        await refused(revoked)
    assert calls["authenticate"] == 2 and calls["key_check"] == 1


async def test_a_client_request_id_can_neither_merge_two_requests_nor_break_one(replica: InProcessReplica) -> None:
    key = replica.key()
    ids = ["same-id", "same-id", "x" * 200, "ikke et id <script>"]
    answers = [
        await replica.client.post(
            "/v1/chat/completions", json=chat(max_tokens=2), headers=auth(key, **{"X-Request-Id": i})
        )
        for i in ids
    ]
    assert [r.status_code for r in answers] == [200] * 4, [r.text for r in answers]
    rows = await replica.ledger()
    assert len(rows) == 4 and len({row["request_id"] for row in rows}) == 4
    assert not {row["request_id"] for row in rows} & set(ids)  # the ledger's ids are the door's own
    billing_ids = [call.billing_id.removeprefix("chatcmpl-") for call, _ in replica.reports]
    assert billing_ids == sorted(billing_ids)  # made in order of time (deployments/request_ids.py)
    # Kept for correlation only when shaped like an id (observability.tracing.request_id).
    assert [call.request_id for call, _ in replica.reports] == ["same-id", "same-id", "", ""]


async def test_a_request_the_engine_fails_before_any_output_is_503_and_costs_nothing(
    replica: InProcessReplica, serving: ServingLayer
) -> None:
    from vllm.v1.engine.exceptions import EngineGenerateError

    key = replica.key(budget_dkk="1")
    serving.scripted.failure = EngineGenerateError()
    try:
        r = await replica.client.post("/v1/chat/completions", json=chat(max_tokens=5), headers=auth(key))
    finally:
        serving.scripted.failure = None
    assert_error(r, 503, "engine_unavailable")
    assert int(r.headers["retry-after"]) >= 1 and set(r.headers) >= RATE_HEADERS
    [row] = await replica.ledger()
    assert (row["status"], row["completion_tokens"], row["cost_nano_dkk"]) == ("failed", 0, 0)
    budget = await replica.budget(key)
    assert budget["reserved_dkk"] == "0" and budget["spent_dkk"] == "0"


async def test_an_engine_failing_mid_stream_ends_the_stream_in_openai_shape_and_bills_what_was_sent(
    replica: InProcessReplica, serving: ServingLayer
) -> None:
    from vllm.v1.engine.exceptions import EngineGenerateError

    key = replica.key()
    body = chat(max_tokens=8, stream=True, stream_options={"include_usage": True})
    serving.scripted.failure, serving.scripted.failure_after = EngineGenerateError(), 3
    try:
        r = await replica.client.post("/v1/chat/completions", json=body, headers=auth(key))
    finally:
        serving.scripted.failure, serving.scripted.failure_after = None, 0
    assert r.status_code == 200 and set(r.headers) >= RATE_HEADERS  # the stream had started
    events = parse_events(r.content)
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert (error["code"], error["type"]) == ("engine_unavailable", "service_unavailable_error"), error
    assert error["message"] == "The model could not complete the request. Please retry."
    chunks = events[:-2]
    assert chunks and all("error" not in c and c["object"] == "chat.completion.chunk" for c in chunks)
    assert not any(c["choices"] and c["choices"][0]["finish_reason"] for c in chunks)  # it did not finish
    [row] = await replica.ledger()
    # What the engine produced before it failed reached the client: it is billed for that and the prompt.
    produced = serving.scripted.produced
    assert (row["status"], row["completion_tokens"]) == ("engine_unavailable", produced), (row, produced)
    assert 0 < produced <= 3 and row["prompt_tokens"] > 0 and int(row["cost_nano_dkk"]) > 0


async def bounded(step: Awaitable[T], what: str) -> T:
    """``step``'s result; one that has none within ``LOUD_S`` fails the test, loudly rather than as a hang (and is
    not cancelled into an answer: vLLM answers a cancelled request with a 400)."""
    task = asyncio.ensure_future(step)
    done, _ = await asyncio.wait({task}, timeout=LOUD_S)
    if not done:
        task.cancel()
        pytest.fail(f"{what} within {LOUD_S:g} s")
    return task.result()


# A request whose engine hangs (testkit/doubles.py::HangingEngineDouble) is aborted while the real engine still works
# on it: greedy, random weights write no end of text, and the tiny model takes seconds over 1,500 tokens.
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", chat(max_tokens=1500, temperature=0)),
        ("/v1/completions", {"model": MODEL, "prompt": QUESTION[0]["content"], "max_tokens": 1500, "temperature": 0}),
    ],
)
async def test_a_whole_request_whose_engine_hangs_is_a_504_in_time_and_the_engine_stops(
    serving: ServingLayer, tmp_path: Path, path: str, body: dict[str, Any]
) -> None:
    """A whole answer is the engine's one output: when it has not come within ``request_s``, the engine request is
    aborted and the client gets a 504 in OpenAI's shape, which, as every error of ours, costs nothing."""
    deadlines = Deadlines(request_s=1.0, stream_idle_s=LOUD_S)
    async with inprocess_replica(serving, tmp_path, deadlines=deadlines) as replica:
        key = replica.key()
        with serving.hanging(outputs=0) as engine:
            r = await bounded(replica.client.post(path, json=body, headers=auth(key)), "no answer")
        error = assert_error(r, 504, "engine_timeout")
        assert error["type"] == "server_error" and set(r.headers) >= RATE_HEADERS
        [row] = await replica.ledger()
        # Aborted while the engine worked on it, which it does no more.
        assert len(engine.aborted) == 1 and engine.aborted[0].startswith(row["request_id"]) and not serving.unfinished
        [(_, metered)] = replica.reports
        assert metered.engine_failed and not metered.finished and metered.output_tokens == 0
        assert (row["status"], row["completion_tokens"], row["cost_nano_dkk"]) == ("failed", 0, 0)


async def test_a_stream_whose_engine_stalls_ends_with_an_error_event_and_pays_for_what_it_was_sent(
    serving: ServingLayer, tmp_path: Path
) -> None:
    """Once a stream has its first output, each next one must come within ``stream_idle_s``: when none does, the
    engine request is aborted, the stream ends with an error event in OpenAI's shape and ``[DONE]``, and the
    tokens it was sent are billed."""
    deadlines = Deadlines(request_s=LOUD_S, stream_idle_s=2.0)
    async with inprocess_replica(serving, tmp_path, deadlines=deadlines) as replica:
        key = replica.key()
        body = chat(max_tokens=1500, temperature=0, stream=True, stream_options={"include_usage": True})
        with serving.hanging(outputs=3) as engine:
            r = await bounded(replica.client.post("/v1/chat/completions", json=body, headers=auth(key)), "no answer")
        assert r.status_code == 200 and set(r.headers) >= RATE_HEADERS  # the stream had started
        events = parse_events(r.content)
        assert events[-1] == "[DONE]"
        error = events[-2]["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == "engine_timeout", error
        chunks = events[:-2]
        assert chunks and all("error" not in c and c["object"] == "chat.completion.chunk" for c in chunks)
        assert not any(c["choices"] and c["choices"][0]["finish_reason"] for c in chunks)  # it did not finish
        [row] = await replica.ledger()
        assert engine.aborted == [row["request_id"]] and not serving.unfinished
        [(_, metered)] = replica.reports
        assert metered.output_tokens == engine.produced > 0 and not metered.finished
        assert (row["status"], row["completion_tokens"]) == ("engine_unavailable", engine.produced), row
        assert int(row["cost_nano_dkk"]) > 0


async def test_a_responses_stream_whose_engine_never_starts_ends_with_an_error_event(
    serving: ServingLayer, tmp_path: Path
) -> None:
    """A stream's first output (queue and prefill) has ``request_s``; past it, the Responses API's stream ends
    with its ``error`` event, not a cut connection."""
    deadlines = Deadlines(request_s=1.0, stream_idle_s=LOUD_S)
    async with inprocess_replica(serving, tmp_path, deadlines=deadlines) as replica:
        key = replica.key()
        body = {"model": MODEL, "input": "Hej", "max_output_tokens": 1500, "temperature": 0, "stream": True}
        with serving.hanging(outputs=0) as engine:
            r = await bounded(replica.client.post("/v1/responses", json=body, headers=auth(key)), "no answer")
        assert r.status_code == 200, r.text
        events = parse_events(r.content)
        kinds = [event["type"] for event in events]
        assert kinds[0] == "response.created" and "response.completed" not in kinds, kinds
        error = events[-1]
        assert error == {"type": "error", "code": "engine_timeout", "message": error["message"], "param": None}
        [row] = await replica.ledger()
        assert len(engine.aborted) == 1 and not serving.unfinished
        assert (row["status"], row["completion_tokens"]) == ("engine_unavailable", 0), row


async def test_a_usage_report_delivered_again_is_acknowledged_and_billed_once(replica: InProcessReplica) -> None:
    from deployments.billing.ledger import UsageEvent
    from deployments.contracts import UsageReport

    key = replica.key()
    r = await replica.client.post("/v1/chat/completions", json=chat(max_tokens=2), headers=auth(key))
    assert r.status_code == 200, r.text
    [row] = await replica.ledger()
    # As the outbox sends a batch again when billing's acknowledgement was lost, twice within one batch too.
    event = UsageEvent(
        str(row["request_id"]),
        str(row["tenant"]),
        str(row["key_id"]),
        MODEL,
        int(row["prompt_tokens"]),
        int(row["cached_tokens"]),
        int(row["completion_tokens"]),
        row["started_at"],
        row["finished_at"],
        str(row["status"]),
    )
    acked = await replica.service.record([UsageReport(event, 0), UsageReport(event, 0)])
    assert acked == [event.request_id] * 2
    assert await replica.ledger() == [row]


async def test_concurrent_requests_overspend_by_at_most_one_request(
    serving: ServingLayer, tmp_path: Path, db: str | None
) -> None:
    async with inprocess_replica(serving, tmp_path, database_url=db) as replica:
        # A request's most cost: its prompt (under 40 tokens, uncached) and 20 output tokens; the budget fits 3.
        max_cost_nano = 40 * 6000 + 20 * 45000
        budget_nano = 3 * max_cost_nano
        key = replica.key(budget_dkk=str(budget_nano / 10**9))
        answers = await asyncio.gather(
            *(
                replica.client.post("/v1/chat/completions", json=chat(max_tokens=20), headers=auth(key))
                for _ in range(16)
            )
        )
        ok = [r for r in answers if r.status_code == 200]
        refused = [r for r in answers if r.status_code == 429]
        assert ok and refused and len(ok) + len(refused) == 16, [r.text for r in answers]
        assert all(r.json()["error"]["code"] == "insufficient_quota" for r in refused)
        rows = await replica.ledger()
        assert len(rows) == len(ok)  # a refused request never ran, and is not in the ledger
        assert sum(int(row["cost_nano_dkk"]) for row in rows) <= budget_nano + max_cost_nano
        assert (await replica.budget(key))["reserved_dkk"] == "0"  # every reservation was settled


async def test_an_organisations_prepaid_credit_covers_all_its_keys(replica: InProcessReplica) -> None:
    operator = Actor.operator("test")
    replica.service.governance.create_tenant(operator, "kommune", budget_kind="prepaid", budget_dkk="0.0001")
    a, b = replica.key("kommune"), replica.key("kommune")
    first = await replica.client.post("/v1/chat/completions", json=chat(max_tokens=5), headers=auth(a))
    assert first.status_code == 200, first.text
    await replica.ledger("kommune")  # spent more than 0.0001 DKK: the credit is gone for every key
    assert_error(
        await replica.client.post("/v1/chat/completions", json=chat(max_tokens=5), headers=auth(b)),
        429,
        "insufficient_quota",
    )
    replica.service.governance.update_tenant(operator, "kommune", budget_kind="prepaid", budget_dkk="1")
    again = await replica.client.post("/v1/chat/completions", json=chat(max_tokens=5), headers=auth(b))
    assert again.status_code == 200, again.text


async def test_rate_limits_answer_429_with_retry_after_and_every_answer_carries_the_headers(
    replica: InProcessReplica,
) -> None:
    key = replica.key(rpm=2)
    first = await replica.client.post("/v1/chat/completions", json=chat(max_tokens=1), headers=auth(key))
    assert set(first.headers) >= RATE_HEADERS and first.headers["x-ratelimit-remaining-requests"] == "1"
    await replica.client.post("/v1/chat/completions", json=chat(max_tokens=1), headers=auth(key))
    r = await replica.client.post("/v1/chat/completions", json=chat(max_tokens=1), headers=auth(key))
    assert assert_error(r, 429, "rate_limit_exceeded")["type"] == "requests"
    assert int(r.headers["retry-after"]) >= 1 and r.headers["x-ratelimit-remaining-requests"] == "0"
    # A client's mistake, turned away before admission, still says where its limits stand.
    bad = await replica.client.post("/v1/chat/completions", json={"model": MODEL}, headers=auth(key))
    assert bad.status_code == 400 and set(bad.headers) >= RATE_HEADERS
    assert len(await replica.ledger()) == 2


async def test_tokens_per_minute_count_the_prompt_and_max_tokens(replica: InProcessReplica) -> None:
    key = replica.key(tpm=100)
    r = await replica.client.post("/v1/chat/completions", json=chat(max_tokens=300), headers=auth(key))
    assert assert_error(r, 429, "rate_limit_exceeded")["type"] == "tokens"
    ok = await replica.client.post("/v1/chat/completions", json=chat(max_tokens=10), headers=auth(key))
    assert ok.status_code == 200 and int(ok.headers["x-ratelimit-remaining-tokens"]) < 100


async def test_allow_lists_by_region_and_the_region_of_processing(replica: InProcessReplica) -> None:
    abroad = replica.key(allowed_models=["region:us"])
    r = await replica.client.post("/v1/chat/completions", json=chat(max_tokens=1), headers=auth(abroad))
    assert_error(r, 403, "model_not_allowed")
    home = replica.key(allowed_models=["region:dk"])
    ok = await replica.client.post("/v1/chat/completions", json=chat(max_tokens=1), headers=auth(home))
    assert ok.status_code == 200 and ok.headers["x-anker-processing-region"] == "dk"
    assert len(await replica.ledger()) == 1


async def test_while_billing_is_away_keys_work_within_what_the_replica_holds_and_no_usage_is_lost(
    replica: InProcessReplica,
) -> None:
    payg, capped, fresh = replica.key(), replica.key(budget_dkk="5"), replica.key(budget_dkk="5")
    told = []
    for key in (payg, capped):  # both admitted while billing is up: the replica holds a slice and a lease of them
        r = await replica.client.post("/v1/chat/completions", json=chat(max_tokens=1), headers=auth(key))
        assert r.status_code == 200, r.text
        told.append(r.json()["usage"]["completion_tokens"])
    await replica.ledger()
    replica.accounts._ttl_s = 60.0  # the keys stay in the replica's cache while billing is away
    for key in (payg, capped, fresh):
        assert (await replica.client.get("/v1/models", headers=auth(key))).status_code == 200
    replica.handle.down = True
    for key in (payg, capped):  # pay-as-you-go, and a budget within the lease this replica holds
        r = await replica.client.post("/v1/chat/completions", json=chat(max_tokens=2), headers=auth(key))
        assert r.status_code == 200, r.text  # its usage waits in the outbox
        told.append(r.json()["usage"]["completion_tokens"])
    # A budget this replica holds no lease of is never spent without one.
    refused = await replica.client.post("/v1/chat/completions", json=chat(max_tokens=2), headers=auth(fresh))
    assert_error(refused, 503, "billing_unavailable")
    assert int(refused.headers["retry-after"]) >= 1
    with pytest.raises(ConnectionError):  # a delivery while billing is away fails, and the reports are kept
        await replica.accounts.outbox.flush_once()
    assert replica.accounts.outbox.pending == 2
    replica.handle.down = False
    rows = await replica.ledger()
    assert len(rows) == 4 and sum(int(row["completion_tokens"]) for row in rows) == sum(told)
    budget = await replica.budget(capped)  # its lease given back: only what it used is spent
    assert budget["reserved_dkk"] == "0" and budget["spent_dkk"] != "0"
