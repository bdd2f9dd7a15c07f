"""Grafana dashboards as code, built with Grafana's own SDK (grafana-foundation-sdk): an SRE dashboard (SLOs, queue,
replicas, errors, KV cache, Ray nodes) and a business dashboard (tokens and DKK by model, cached share).

Every query comes from ``observability.queries``; ``expressions`` lists them for the test on a real Prometheus.
"""

from __future__ import annotations

import json
from typing import Any

from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef

from observability import queries

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")


def _query(expr: str, legend: str = "", ref: str = "A") -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref)


def _series(title: str, unit: str, *targets: tuple[str, str], description: str = "", width: int = 12) -> Any:
    panel = timeseries.Panel().title(title).unit(unit).datasource(DATASOURCE).height(8).span(width)
    if description:
        panel = panel.description(description)
    for i, (expr, legend) in enumerate(targets):
        panel = panel.with_target(_query(expr, legend, chr(ord("A") + i)))
    return panel


def _stat(title: str, unit: str, expr: str, width: int = 6) -> Any:
    return stat.Panel().title(title).unit(unit).datasource(DATASOURCE).height(4).span(width).with_target(_query(expr))


def _base(uid: str, title: str) -> dashboard.Dashboard:
    datasource = dashboard.DatasourceVariable("datasource").label("Prometheus").type("prometheus")
    return (
        dashboard.Dashboard(title)
        .uid(uid)
        .tags(["anker"])
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("browser")
        .with_variable(datasource)
    )


def sre_dashboard() -> dashboard.Dashboard:
    return (
        _base("anker-sre", "Anker: SRE")
        .with_row(dashboard.Row("Service levels"))
        .with_panel(_stat("5xx share (5m)", "percentunit", queries.ERROR_RATIO))
        .with_panel(_stat("Usage reports pending", "short", queries.USAGE_PENDING))
        .with_panel(
            _series(
                "Time to first token", "s", (queries.TTFT_P50, "p50 {{model}}"), (queries.TTFT_P95, "p95 {{model}}")
            )
        )
        .with_panel(_series("Inter-token latency p95", "s", (queries.INTER_TOKEN_P95, "{{model}}")))
        .with_panel(_series("Request duration p95", "s", (queries.DURATION_P95, "{{model}}")))
        .with_panel(_series("Requests by status", "reqps", (queries.REQUESTS_BY_STATUS, "{{status_code}}")))
        .with_row(dashboard.Row("Capacity"))
        .with_panel(
            _series(
                "Engine queue (vLLM waiting + running)",
                "short",
                (queries.ENGINE_QUEUE_BY_REPLICA, "{{model}} {{replica}}"),
                description="What the autoscaler sizes replicas by.",
            )
        )
        .with_panel(_series("KV-cache use", "percentunit", (queries.KV_CACHE_BY_REPLICA, "{{model}} {{replica}}")))
        .with_panel(
            _series(
                "Replicas wanted vs running",
                "short",
                (queries.REPLICAS_WANTED, "wanted {{deployment}}"),
                (queries.REPLICAS_RUNNING, "running {{deployment}}"),
            )
        )
        .with_row(dashboard.Row("Ray nodes"))
        .with_panel(_series("Node CPU", "percent", (queries.NODE_CPU, "{{instance}}")))
        .with_panel(_series("Node memory", "percentunit", (queries.NODE_MEMORY, "{{instance}}")))
    )


def business_dashboard() -> dashboard.Dashboard:
    return (
        _base("anker-business", "Anker: tokens and DKK")
        .with_panel(_stat("DKK billed, last 24 h", "none", queries.DKK_TODAY))
        .with_panel(_stat("Cached share of input tokens (1h)", "percentunit", queries.CACHED_SHARE))
        .with_panel(_series("DKK per hour by model", "none", (queries.DKK_PER_HOUR_BY_MODEL, "{{model}}")))
        .with_panel(
            _series("Tokens per second by model and kind", "short", (queries.TOKENS_BY_KIND, "{{model}} {{kind}}"))
        )
        .with_panel(_series("Tokens per hour by model", "short", (queries.TOKENS_PER_HOUR_BY_MODEL, "{{model}}")))
        .with_panel(_series("Requests per second by model", "reqps", (queries.REQUESTS_BY_MODEL, "{{model}}")))
    )


def dashboards() -> dict[str, dict[str, Any]]:
    """uid -> the dashboard's JSON model, as Grafana stores it."""
    built = {}
    for builder in (sre_dashboard(), business_dashboard()):
        model = json.loads(JSONEncoder(sort_keys=True, indent=2).encode(builder.build()))
        built[model["uid"]] = model
    return built


def expressions() -> list[str]:
    return [
        target["expr"]
        for model in dashboards().values()
        for panel in model.get("panels", [])
        for target in panel.get("targets", [])
        if "expr" in target
    ]
