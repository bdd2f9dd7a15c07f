"""Metrics on the real stack: after some traffic, Ray's metrics agent exports Anker's metrics in Prometheus format
(latency histograms, requests by status, tokens by kind, DKK billed, engine queue and KV cache per replica, replicas
wanted vs running, usage reports pending), with bounded labels that never carry a tenant, a key or text.
"""

from __future__ import annotations

import re
import time

import httpx
import openai
import pytest

from tests.conftest import AUTOSCALED_MODEL, Stack

pytestmark = pytest.mark.stack

FAMILIES = (
    "ray_anker_time_to_first_token_seconds_bucket",
    "ray_anker_inter_token_latency_seconds_bucket",
    "ray_anker_request_duration_seconds_bucket",
    "ray_anker_requests_total",
    "ray_anker_tokens_total",
    "ray_anker_billed_dkk_total",
    "ray_anker_engine_queue",
    "ray_anker_engine_kv_cache_usage",
    "ray_anker_replicas_wanted",
    "ray_anker_replicas_running",
    "ray_anker_usage_reports_pending",
    "ray_anker_router_decisions_total",
    "ray_anker_router_prompt_blocks_total",
)


def scrape(stack: Stack) -> str:
    port = stack.env["ANKER__RAY__METRICS_EXPORT_PORT"]
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


def samples(text: str, family: str) -> list[tuple[dict[str, str], float]]:
    found = []
    for line in text.splitlines():
        match = re.match(rf"^{family}{{(.*)}} (\S+)$", line)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
            found.append((labels, float(match.group(2))))
    return found


def total(text: str, family: str, **labels: str) -> float:
    """The sum of a family's samples whose labels include ``labels``."""
    return sum(v for found, v in samples(text, family) if labels.items() <= found.items())


def test_anker_metrics_are_exported_with_bounded_labels(stack: Stack) -> None:
    # Counters only grow, and earlier tests raised them: this test's traffic must show as growth from here.
    before = scrape(stack)
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=stack.api_key, max_retries=0, timeout=120)
    told = 0  # output tokens the clients were told of
    for model in ("qwen3-next-tiny", AUTOSCALED_MODEL):
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Metrikker, tak"}],
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
        told += sum(c.usage.completion_tokens for c in stream if c.usage)
    assert told > 0
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])

    def problems(text: str) -> list[str]:
        found = [f"not exported: {f}" for f in FAMILIES if not samples(text, f)]

        def grew(family: str, **labels: str) -> float:
            return total(text, family, **labels) - total(before, family, **labels)

        for model in ("qwen3-next-tiny", AUTOSCALED_MODEL):
            if grew("ray_anker_requests_total", model=model, status_code="200") < 1:
                found.append(f"no new 200 of {model}")
        if grew("ray_anker_requests_total", model="-", status_code="404") < 1:
            found.append("no new 404 under the model label '-'")  # unknown names are never a label
        if grew("ray_anker_tokens_total", kind="output") < told:
            found.append(f"fewer than the {told} output tokens the clients were told of counted")
        if not grew("ray_anker_billed_dkk_total") > 0:
            found.append("no new DKK billed")
        engines = {labels["model"] for labels, _ in samples(text, "ray_anker_engine_queue")}
        if not engines >= {"qwen3-next-tiny", AUTOSCALED_MODEL}:
            found.append("an engine's queue is missing")
        decisions = {labels["decision"] for labels, _ in samples(text, "ray_anker_router_decisions_total")}
        if not decisions >= {"no_match", "other_call"}:  # a new prompt, and a request with none to read
            found.append(f"routing decisions missing: {decisions}")
        wanted = {labels["deployment"]: v for labels, v in samples(text, "ray_anker_replicas_wanted")}
        if wanted.get(f"Engine-{AUTOSCALED_MODEL}", 0) < 1:
            found.append("replicas wanted below the floor")
        return found

    # Workers push their metrics to the node's agent every few seconds: poll until this traffic shows.
    deadline = time.monotonic() + 90
    text = scrape(stack)
    while problems(text) and time.monotonic() < deadline:
        time.sleep(2)
        text = scrape(stack)
    assert not problems(text), problems(text)
    for line in text.splitlines():
        if line.startswith("ray_anker_"):
            assert "tenant" not in line and "ank_" not in line and "Metrikker" not in line
