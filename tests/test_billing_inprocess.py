"""Billing on the request path, in-process: the real app, tokenizer logic and billing deployment class on SQLite,
with engine doubles. Usage billed equals usage seen, cut-off streams, free failures, budgets under concurrency,
rate limits and their headers, allow-lists, roles, tenant isolation, the admin API, the audit log, and billing
restarts.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from deployments.billing.governance import Actor
from deployments.openai.parsing import parse_request
from deployments.openai.protocol import ChatCompletionRequest
from deployments.openai.usage import RequestContext
from deployments.tokenizer import TokenizerCore, TokenizerSpec
from testkit.doubles import InstantEngineDouble
from testkit.sse import parse_events
from tests.inprocess import CTX, InProcessStack, inprocess_stack

RATE_HEADERS = {
    f"x-ratelimit-{kind}-{what}" for kind in ("limit", "remaining", "reset") for what in ("requests", "tokens")
}
MODEL = "qwen3-next-tiny"


@pytest.fixture(scope="module")
def core(tiny_models: dict[str, Path]) -> TokenizerCore:
    specs = [TokenizerSpec(n, p, CTX) for n, p in tiny_models.items()]
    specs.append(TokenizerSpec("elsewhere-tiny", tiny_models["qwen3-moe-tiny"], CTX))
    return TokenizerCore(specs, block_size=16)


@pytest.fixture
async def stack(core: TokenizerCore, tmp_path: Path, db: str | None) -> AsyncIterator[InProcessStack]:
    engines = {
        MODEL: InstantEngineDouble(),
        "qwen3-moe-tiny": InstantEngineDouble(),
        "elsewhere-tiny": InstantEngineDouble(),
    }
    async with inprocess_stack(core, tmp_path, engines, database_url=db) as s:
        yield s


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(**extra: object) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hvad koster en rødgrød med fløde?"}], **extra}


def ledger_rows(stack: InProcessStack, tenant: str = "t") -> list[dict[str, object]]:
    return list(stack.service.ledger.events(tenant))


def expected_cost_nano(usage: dict[str, int]) -> int:
    cached = usage["prompt_tokens_details"]["cached_tokens"]  # type: ignore[index]
    uncached = usage["prompt_tokens"] - cached
    return uncached * 6000 + cached * 3000 + usage["completion_tokens"] * 45000


def assert_error(r: httpx.Response, status: int, code: str) -> dict[str, object]:
    assert r.status_code == status, r.text
    error: dict[str, object] = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    return error


async def test_the_ledger_bills_exactly_the_usage_the_client_saw(stack: InProcessStack) -> None:
    key = stack.key("t")
    seen = []
    for body in (
        chat(max_tokens=5),
        chat(max_tokens=3, n=2),
        chat(max_tokens=4, stream=True, stream_options={"include_usage": True}),
    ):
        r = await stack.client.post("/v1/chat/completions", json=body, headers=auth(key))
        assert r.status_code == 200 and set(r.headers) >= RATE_HEADERS
        seen.append(r.json()["usage"] if not body.get("stream") else parse_events(r.content)[-2]["usage"])
    r = await stack.client.post(
        "/v1/completions", json={"model": MODEL, "prompt": ["a", "bb"], "max_tokens": 2}, headers=auth(key)
    )
    seen.append(r.json()["usage"])
    await stack.deliver_usage()
    rows = ledger_rows(stack)
    assert len(rows) == 4 and len({r["request_id"] for r in rows}) == 4
    assert sorted(r["cost_nano_dkk"] for r in rows) == sorted(expected_cost_nano(u) for u in seen)
    assert sorted(r["completion_tokens"] for r in rows) == sorted(u["completion_tokens"] for u in seen)
    for row in rows:  # the split by kind adds up
        parts = row["cost_input_uncached_nano_dkk"], row["cost_input_cached_nano_dkk"], row["cost_output_nano_dkk"]
        assert sum(parts) == row["cost_nano_dkk"]  # type: ignore[arg-type]
    usage = (await stack.client.get("/v1/usage", params={"group_by": "model"}, headers=auth(key))).json()
    assert usage["totals"]["requests"] == 4
    assert usage["totals"]["cost_nano_dkk"] == sum(expected_cost_nano(u) for u in seen)
    assert [b["model"] for b in usage["data"]] == [MODEL]


async def test_a_client_supplied_request_id_cannot_merge_two_requests(stack: InProcessStack) -> None:
    key = stack.key("t")
    for _ in range(2):
        r = await stack.client.post(
            "/v1/chat/completions", json=chat(max_tokens=2), headers={**auth(key), "X-Request-Id": "same"}
        )
        assert r.status_code == 200
    await stack.deliver_usage()
    assert len(ledger_rows(stack)) == 2


async def test_a_replayed_report_is_billed_once(stack: InProcessStack) -> None:
    key = stack.key("t")
    await stack.client.post("/v1/chat/completions", json=chat(max_tokens=2), headers=auth(key))
    await stack.deliver_usage()
    row = ledger_rows(stack)[0]
    from deployments.billing.ledger import UsageEvent
    from deployments.billing.service import UsageReport

    event = UsageEvent(
        str(row["request_id"]),
        "t",
        str(row["key_id"]),
        MODEL,
        5,
        0,
        2,
        row["started_at"],
        row["finished_at"],
        "ok",  # type: ignore[arg-type]
    )
    acked = await stack.service.record([UsageReport(event, 0), UsageReport(event, 0)])
    assert acked == [event.request_id] * 2 and len(ledger_rows(stack)) == 1


async def test_a_stream_cut_off_by_the_client_is_billed_for_the_tokens_produced(
    core: TokenizerCore, tmp_path: Path, db: str | None
) -> None:
    # httpx's in-process transport cannot hang up mid-body, so this drives the stream the way Starlette does when
    # the client goes: it stops iterating and closes the generator. (The stack tests hang up over real HTTP.)
    engine = InstantEngineDouble(delay_s=0.01)
    async with inprocess_stack(core, tmp_path, {MODEL: engine}, database_url=db) as stack:
        key = stack.key("t")
        record = await stack.accounts.verify(key)
        assert record is not None
        request = parse_request(ChatCompletionRequest, json.dumps(chat(max_tokens=200, stream=True)).encode(), ())
        events = await stack.openai.chat(request, RequestContext(record, "chatcmpl-cut", "chatcmpl-bill-cut"))
        assert not isinstance(events, dict)
        received = 0
        async for chunk in events:
            if b'"content":"t' in chunk:
                received += 1
                if received == 3:
                    break
        await events.aclose()  # type: ignore[attr-defined]
        await stack.deliver_usage()
        [row] = ledger_rows(stack)
        assert row["request_id"] == "chatcmpl-bill-cut" and row["status"] == "cancelled"
        assert 3 <= row["completion_tokens"] < 200  # type: ignore[operator]
        assert row["cost_output_nano_dkk"] == row["completion_tokens"] * 45000  # type: ignore[operator]
        assert row["cost_nano_dkk"] > row["cost_output_nano_dkk"]  # type: ignore[operator]  # the prompt is billed too
        assert engine.cancelled == ["chatcmpl-cut"]


async def test_a_request_that_failed_before_any_output_costs_nothing(
    core: TokenizerCore, tmp_path: Path, db: str | None
) -> None:
    async with inprocess_stack(core, tmp_path, {MODEL: InstantEngineDouble(fail_after=0)}, database_url=db) as stack:
        key = stack.key("t", budget_dkk="1")
        r = await stack.client.post("/v1/chat/completions", json=chat(max_tokens=5), headers=auth(key))
        assert_error(r, 503, "engine_unavailable")
        await stack.deliver_usage()
        [row] = ledger_rows(stack)
        assert row["cost_nano_dkk"] == 0 and row["completion_tokens"] == 0 and row["status"] == "engine_unavailable"
        summary = (await stack.client.get("/v1/usage/summary", headers=auth(key))).json()
        assert summary["budget"]["reserved_dkk"] == "0" and summary["budget"]["spent_dkk"] == "0"


async def test_a_used_up_budget_answers_429_insufficient_quota(stack: InProcessStack) -> None:
    key = stack.key("t", budget_dkk="0")
    r = await stack.client.post("/v1/chat/completions", json=chat(max_tokens=2), headers=auth(key))
    error = assert_error(r, 429, "insufficient_quota")
    assert error["type"] == "insufficient_quota" and set(r.headers) >= RATE_HEADERS
    await stack.deliver_usage()
    assert ledger_rows(stack) == []


async def test_concurrent_requests_overspend_by_at_most_one_request(
    core: TokenizerCore, tmp_path: Path, db: str | None
) -> None:
    async with inprocess_stack(core, tmp_path, {MODEL: InstantEngineDouble(delay_s=0.01)}, database_url=db) as stack:
        # A request's maximum cost: prompt (< 40 tokens, uncached) + 20 output tokens; the budget fits about 3.
        max_cost_nano = 40 * 6000 + 20 * 45000
        budget_nano = 3 * max_cost_nano
        key = stack.key("t", budget_dkk=str(budget_nano / 10**9))
        responses = await asyncio.gather(
            *(stack.client.post("/v1/chat/completions", json=chat(max_tokens=20), headers=auth(key)) for _ in range(24))
        )
        ok = [r for r in responses if r.status_code == 200]
        refused = [r for r in responses if r.status_code == 429]
        assert ok and refused and len(ok) + len(refused) == 24
        assert all(r.json()["error"]["code"] == "insufficient_quota" for r in refused)
        await stack.deliver_usage()
        spent = sum(int(row["cost_nano_dkk"]) for row in ledger_rows(stack))  # type: ignore[call-overload]
        assert spent <= budget_nano + max_cost_nano
        summary = (await stack.client.get("/v1/usage/summary", headers=auth(key))).json()
        assert summary["budget"]["reserved_dkk"] == "0"  # every reservation was settled


async def test_tenant_prepaid_credit_covers_all_its_keys(stack: InProcessStack) -> None:
    operator = Actor.operator("test")
    stack.service.governance.create_tenant(operator, "kommune", budget_kind="prepaid", budget_dkk="0.0001")
    a, b = stack.key("kommune"), stack.key("kommune")
    assert (
        await stack.client.post("/v1/chat/completions", json=chat(max_tokens=5), headers=auth(a))
    ).status_code == 200
    await stack.deliver_usage()  # spent 0.0001+ DKK: the credit is gone for every key of the tenant
    r = await stack.client.post("/v1/chat/completions", json=chat(max_tokens=5), headers=auth(b))
    assert_error(r, 429, "insufficient_quota")
    stack.service.governance.update_tenant(operator, "kommune", budget_kind="prepaid", budget_dkk="1")
    assert (
        await stack.client.post("/v1/chat/completions", json=chat(max_tokens=5), headers=auth(b))
    ).status_code == 200


async def test_rate_limits_answer_429_with_retry_after_and_headers_everywhere(stack: InProcessStack) -> None:
    key = stack.key("t", rpm=2)
    models = await stack.client.get("/v1/models", headers=auth(key))
    assert set(models.headers) >= RATE_HEADERS and models.headers["x-ratelimit-limit-requests"] == "2"
    first = await stack.client.post("/v1/chat/completions", json=chat(max_tokens=1), headers=auth(key))
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    await stack.client.post("/v1/chat/completions", json=chat(max_tokens=1), headers=auth(key))
    r = await stack.client.post("/v1/chat/completions", json=chat(max_tokens=1), headers=auth(key))
    error = assert_error(r, 429, "rate_limit_exceeded")
    assert error["type"] == "requests" and int(r.headers["retry-after"]) >= 1
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    bad = await stack.client.post("/v1/chat/completions", json={"model": MODEL}, headers=auth(key))
    assert bad.status_code == 400 and set(bad.headers) >= RATE_HEADERS


async def test_tokens_per_minute_count_prompt_and_max_tokens(stack: InProcessStack) -> None:
    key = stack.key("t", tpm=100)
    r = await stack.client.post("/v1/chat/completions", json=chat(max_tokens=300), headers=auth(key))
    assert assert_error(r, 429, "rate_limit_exceeded")["type"] == "tokens"
    ok = await stack.client.post("/v1/chat/completions", json=chat(max_tokens=10), headers=auth(key))
    assert ok.status_code == 200 and int(ok.headers["x-ratelimit-remaining-tokens"]) < 100


async def test_allow_lists_by_model_and_region(stack: InProcessStack) -> None:
    key = stack.key("t", allowed_models=["region:dk"])
    r = await stack.client.post("/v1/chat/completions", json=chat(model="elsewhere-tiny"), headers=auth(key))
    assert_error(r, 403, "model_not_allowed")
    listed = (await stack.client.get("/v1/models", headers=auth(key))).json()["data"]
    assert sorted(m["id"] for m in listed) == ["qwen3-moe-tiny", MODEL]
    only_moe = stack.key("t", allowed_models=["qwen3-moe-tiny"])
    assert_error(
        await stack.client.post("/v1/chat/completions", json=chat(), headers=auth(only_moe)), 403, "model_not_allowed"
    )
    assert_error(await stack.client.get(f"/v1/models/{MODEL}", headers=auth(only_moe)), 403, "model_not_allowed")
    ok = await stack.client.post(
        "/v1/chat/completions", json=chat(model="qwen3-moe-tiny", max_tokens=1), headers=auth(only_moe)
    )
    assert ok.status_code == 200 and ok.headers["x-anker-processing-region"] == "dk"


async def test_a_viewer_sees_usage_but_cannot_call_models(stack: InProcessStack) -> None:
    viewer = stack.key("t", role="viewer")
    assert_error(
        await stack.client.post("/v1/chat/completions", json=chat(), headers=auth(viewer)), 403, "permission_denied"
    )
    assert (await stack.client.get("/v1/usage", headers=auth(viewer))).status_code == 200
    assert_error(await stack.client.get("/admin/tenants/t/keys", headers=auth(viewer)), 403, "permission_denied")


async def test_a_key_never_sees_another_tenants_usage_or_keys(stack: InProcessStack) -> None:
    a, b = stack.key("tenant-a", role="admin"), stack.key("tenant-b", role="admin")
    await stack.client.post("/v1/chat/completions", json=chat(max_tokens=3), headers=auth(a))
    await stack.deliver_usage()
    usage_b = (await stack.client.get("/v1/usage", headers=auth(b))).json()
    assert usage_b["tenant"] == "tenant-b" and usage_b["totals"]["requests"] == 0
    assert (await stack.client.get("/v1/usage", headers=auth(a))).json()["totals"]["requests"] == 1
    assert_error(await stack.client.get("/admin/tenants/tenant-a/keys", headers=auth(b)), 404, "not_found")
    a_key_id = a.split("_")[1]
    assert_error(await stack.client.delete(f"/admin/keys/{a_key_id}", headers=auth(b)), 404, "not_found")


async def test_billing_restarts_lose_no_usage(stack: InProcessStack) -> None:
    payg, capped = stack.key("t"), stack.key("t", budget_dkk="5")
    for key in (payg, capped):  # both verified while billing is up (and cached by the ingress)
        assert (
            await stack.client.post("/v1/chat/completions", json=chat(max_tokens=1), headers=auth(key))
        ).status_code == 200
    await stack.deliver_usage()
    stack.accounts._ttl_s = 60.0
    for key in (payg, capped):
        await stack.client.get("/v1/models", headers=auth(key))
    stack.handle.down = True
    r = await stack.client.post("/v1/chat/completions", json=chat(max_tokens=2), headers=auth(payg))
    assert r.status_code == 200  # pay-as-you-go keeps working; its usage waits in the outbox
    assert_error(
        await stack.client.post("/v1/chat/completions", json=chat(), headers=auth(capped)), 503, "billing_unavailable"
    )
    with pytest.raises(ConnectionError):  # a delivery while billing is away fails, and the report is kept
        await stack.accounts.outbox.flush_once()
    assert stack.accounts.outbox.pending == 1 and len(ledger_rows(stack)) == 2
    stack.handle.down = False
    await stack.deliver_usage()
    rows = ledger_rows(stack)
    assert len(rows) == 3 and sum(int(r["completion_tokens"]) for r in rows) == 4  # type: ignore[call-overload]
