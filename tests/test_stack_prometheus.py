"""Observability checked on a real Prometheus (Debian's package): it scrapes the test stack's Ray metrics agent
under traffic, and every PromQL expression of the Grafana dashboards and of the alert rules parses and returns data;
promtool accepts the alert rules.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from config.settings import load_config
from observability import queries
from observability.alerts import expressions as alert_expressions
from observability.alerts import render as render_alerts
from observability.dashboards import expressions as dashboard_expressions
from testkit.prometheus import PROMTOOL, Prometheus, throwaway_prometheus
from tests.conftest import Stack

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def prometheus(stack: Stack) -> Iterator[Prometheus]:
    with throwaway_prometheus([f"127.0.0.1:{stack.env['ANKER__RAY__METRICS_EXPORT_PORT']}"]) as server:
        yield server


def traffic(stack: Stack) -> None:
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=stack.api_key, max_retries=0, timeout=120)
    for model in ("qwen3-next-tiny", "qwen3-moe-tiny"):
        for _ in range(2):
            list(
                client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "Hvad er klokken?"}], max_tokens=5, stream=True
                )
            )


def test_alert_rules_pass_promtool(stack: Stack, tmp_path: Path) -> None:
    rules = tmp_path / "anker.rules.yml"
    rules.write_text(render_alerts(load_config(None, dict(stack.env))))
    check = subprocess.run([str(PROMTOOL), "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS" in check.stdout


def test_every_dashboard_and_alert_expression_returns_data(stack: Stack, prometheus: Prometheus) -> None:
    config = load_config(None, dict(stack.env))
    # The signals the alert rules compare with their thresholds (the rules themselves only return data when firing).
    signals = [
        queries.slow_first_token_ratio(config.observability.ttft_slo_s, "5m"),
        queries.error_ratio("5m"),
        queries.ENGINE_QUEUE_PER_REPLICA,
        queries.REPLICAS_RUNNING,
        queries.USAGE_PENDING,
    ]
    dashboard = dashboard_expressions()
    traffic(stack)
    deadline = time.monotonic() + 120
    empty: list[str] = dashboard + signals
    while empty and time.monotonic() < deadline:
        time.sleep(3)
        empty = [e for e in dashboard + signals if not prometheus.query(e)["data"]["result"]]
        if empty:
            traffic(stack)  # keep rates non-zero inside the 5m windows
    assert not empty, f"no data for: {empty}"
    for expr in alert_expressions(config):  # every rule parses and evaluates (firing or not)
        answer = prometheus.query(expr)
        assert answer["status"] == "success", (expr, answer)
