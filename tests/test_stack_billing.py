"""Billing on the real stack: the official ``openai`` SDK against `anker up`, then the ledger (the SQLite file the
billing actor owns) must hold exactly what the client was told, in DKK; the customer dashboard in real headless
Chromium shows the ledger's numbers; and a killed billing actor is restarted by Ray Serve without losing usage.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from deployments.billing.budgets import month_bounds, month_period
from deployments.billing.ledger import Ledger
from deployments.database import database_url
from tests.browser import chromium_page, sign_in
from tests.conftest import BILLING, Stack

pytestmark = pytest.mark.stack

PRICE_NANO = {"uncached": 6000, "cached": 3000, "output": 45000}  # the local profile's 6 / 3 / 45 DKK per 1M


def ledger_rows(stack: Stack, tenant: str, expected: int, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """The tenant's ledger rows once ``expected`` of them have arrived (usage is delivered asynchronously)."""
    ledger = Ledger(database_url(stack.data_dir, None))
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            rows = list(ledger.events(tenant))
            if len(rows) >= expected or time.monotonic() > deadline:
                return rows
            time.sleep(0.25)
    finally:
        ledger.dispose()


def cost_of(usage: Any) -> int:
    cached = usage.prompt_tokens_details.cached_tokens
    return (
        (usage.prompt_tokens - cached) * PRICE_NANO["uncached"]
        + cached * PRICE_NANO["cached"]
        + usage.completion_tokens * PRICE_NANO["output"]
    )


def test_the_dkk_charged_equals_the_usage_the_sdk_saw(stack: Stack) -> None:
    key = stack.new_key("sdk-billing")
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0, timeout=120)
    seen = []
    long = " ".join(f"Punkt {i}: borgeren søger om byggetilladelse." for i in range(60))
    for model in ("qwen3-next-tiny", "qwen3-moe-tiny"):
        for _ in range(3):  # a repeated long prompt: later requests are partly cached, and billed cheaper
            r = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": long}], max_tokens=4, temperature=0
            )
            assert r.usage is not None
            seen.append((r.id, r.usage))
    stream = client.chat.completions.create(
        model="qwen3-next-tiny",
        messages=[{"role": "user", "content": "Skriv et kort digt om Aarhus."}],
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = [c.usage for c in stream if c.usage is not None][-1]
    seen.append(("stream", usage))
    raw = client.chat.completions.with_raw_response.create(
        model="qwen3-moe-tiny", messages=[{"role": "user", "content": "Hej"}], max_tokens=2
    )
    assert raw.headers["x-ratelimit-limit-requests"] and raw.headers["x-ratelimit-remaining-tokens"]
    seen.append(("raw", raw.parse().usage))

    rows = ledger_rows(stack, "sdk-billing", len(seen))
    assert len(rows) == len(seen)
    assert any(u.prompt_tokens_details.cached_tokens > 0 for _, u in seen)
    assert sorted(int(r["cost_nano_dkk"]) for r in rows) == sorted(cost_of(u) for _, u in seen)
    assert sum(int(r["cached_tokens"]) for r in rows) == sum(u.prompt_tokens_details.cached_tokens for _, u in seen)
    for row in rows:  # counts, ids and amounts only
        assert set(row) >= {"request_id", "tenant", "key_id", "model", "cost_nano_dkk"}
        assert not any(isinstance(v, str) and "Aarhus" in v for v in row.values())

    # The customer's view agrees: /v1/usage for this key's tenant, in exact DKK.
    r = httpx.get(
        f"{stack.base_url}/v1/usage", params={"group_by": "model"}, headers={"Authorization": f"Bearer {key}"}
    )
    assert r.status_code == 200
    body = r.json()
    assert body["totals"]["requests"] == len(seen)
    assert body["totals"]["cost_nano_dkk"] == sum(cost_of(u) for _, u in seen)
    assert sorted(b["model"] for b in body["data"]) == ["qwen3-moe-tiny", "qwen3-next-tiny"]


def test_budget_and_allow_list_on_the_real_stack(stack: Stack) -> None:
    capped = stack.new_key("capped", "--budget-dkk", "0")
    only_moe = stack.new_key("capped", "--models", "qwen3-moe-tiny")
    body = {"model": "qwen3-next-tiny", "messages": [{"role": "user", "content": "Hej"}], "max_tokens": 2}
    r = httpx.post(f"{stack.base_url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {capped}"})
    assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"
    r = httpx.post(f"{stack.base_url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {only_moe}"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"


def test_the_dashboard_shows_what_the_ledger_holds(stack: Stack, tmp_path: Path) -> None:
    key = stack.new_key("dashboard-kommune", "--budget-dkk", "10")
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0, timeout=120)
    for model in ("qwen3-next-tiny", "qwen3-moe-tiny"):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Godmorgen"}], max_tokens=5)
    rows = ledger_rows(stack, "dashboard-kommune", 2)
    assert len(rows) == 2
    # The engine replicas give their leases of the budget back once the key has been idle for a moment.
    wait_until_no_budget_is_held(stack, key)
    ledger = Ledger(database_url(stack.data_dir, None))
    start, end = month_bounds(month_period(datetime.now(UTC)))
    [total] = ledger.usage("dashboard-kommune", start, end)
    ledger.dispose()

    with chromium_page() as page:
        sign_in(page, stack.base_url, key, timeout_ms=30_000)
        shown_cost = page.get_attribute("#total-dkk", "data-value")
        assert shown_cost is not None and Decimal(shown_cost) * 10**9 == total.cost_nano_dkk
        assert page.get_attribute("#requests", "data-value") == "2"
        assert page.get_attribute("#tokens-output", "data-value") == str(total.completion_tokens)
        assert page.get_attribute("#tokens-cached", "data-value") == str(total.cached_tokens)
        assert page.get_attribute("#tokens-uncached", "data-value") == str(total.prompt_tokens - total.cached_tokens)
        assert page.locator("#by-model tbody tr").count() == 2
        assert page.locator("#daily-chart rect").count() >= 1
        left = page.get_attribute("#budget-left", "data-value")
        assert left is not None and Decimal(left) * 10**9 == 10 * 10**9 - total.cost_nano_dkk
        shot = tmp_path / "dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000


def wait_until_no_budget_is_held(stack: Stack, key: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        r = httpx.get(f"{stack.base_url}/v1/usage/summary", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text
        if r.json()["budget"]["reserved_dkk"] == "0":
            return
        assert time.monotonic() < deadline, r.json()["budget"]
        time.sleep(0.5)


def test_a_killed_billing_actor_is_restarted_and_no_usage_is_lost(stack: Stack) -> None:
    import ray

    key = stack.new_key("restart-kommune")
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0, timeout=120)
    stack.connect()
    try:
        [billing] = stack.alive_replicas(BILLING)
        ray.kill(ray.get_actor(billing, namespace="serve"), no_restart=True)
        answered = 0
        deadline = time.monotonic() + 120
        while answered < 3 and time.monotonic() < deadline:
            try:
                client.chat.completions.create(
                    model="qwen3-moe-tiny", messages=[{"role": "user", "content": "Hej"}], max_tokens=2
                )
                answered += 1
            except (openai.APIStatusError, openai.APIConnectionError):
                time.sleep(1)
        assert answered == 3
        rows = ledger_rows(stack, "restart-kommune", 3, timeout_s=90)
        assert len(rows) == 3
    finally:
        ray.shutdown()
