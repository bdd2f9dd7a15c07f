"""Anker's metrics, exported by Ray's metrics agent in Prometheus format (names gain Ray's ``ray_`` prefix).

Latency histograms by model (time to first token, inter-token, end to end), requests by status code, tokens by kind,
DKK billed, engine queue depth and KV-cache use per replica, replicas wanted and running, usage reports pending and
set aside.
Engine routing decisions and prefix blocks matched. Labels are bounded: model, status code, token kind, deployment,
replica id, routing decision; never a tenant, a key or any text.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from functools import cache
from typing import Any

from config.schema import LATENCY_BUCKETS_S

LATENCY_S = list(LATENCY_BUCKETS_S)
INTER_TOKEN_S = [0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
TOKEN_KINDS = ("uncached", "cached", "output")
NO_MODEL = "-"  # the model label of a call that reached no model (an unknown one, or one not up yet)

_lock = threading.Lock()


@cache
def _metric(kind: str, name: str, description: str, tags: Sequence[str], boundaries: Sequence[float] = ()) -> Any:
    from ray.util import metrics

    with _lock:
        if kind == "counter":
            return metrics.Counter(name, description=description, tag_keys=tuple(tags))
        if kind == "gauge":
            return metrics.Gauge(name, description=description, tag_keys=tuple(tags))
        return metrics.Histogram(name, description=description, boundaries=list(boundaries), tag_keys=tuple(tags))


def first_token(model: str, seconds: float) -> None:
    _metric(
        "histogram",
        "anker_time_to_first_token_seconds",
        "Request start to first output token.",
        ("model",),
        tuple(LATENCY_S),
    ).observe(seconds, tags={"model": model})


def inter_token(model: str, seconds: float) -> None:
    _metric(
        "histogram",
        "anker_inter_token_latency_seconds",
        "Time between output tokens of a stream (per token).",
        ("model",),
        tuple(INTER_TOKEN_S),
    ).observe(seconds, tags={"model": model})


def request_done(model: str, status_code: int, seconds: float) -> None:
    _metric(
        "histogram", "anker_request_duration_seconds", "Request start to its last byte.", ("model",), tuple(LATENCY_S)
    ).observe(seconds, tags={"model": model})
    _metric("counter", "anker_requests", "Inference requests by HTTP status code.", ("model", "status_code")).inc(
        1, tags={"model": model, "status_code": str(status_code)}
    )


def tokens(model: str, uncached: int, cached: int, output: int) -> None:
    counter = _metric("counter", "anker_tokens", "Tokens billed, by kind.", ("model", "kind"))
    for kind, count in zip(TOKEN_KINDS, (uncached, cached, output), strict=True):
        if count:
            counter.inc(count, tags={"model": model, "kind": kind})


def billed(model: str, nano_dkk: int) -> None:
    if nano_dkk:
        _metric(
            "counter", "anker_billed_dkk", "DKK billed (the ledger is the record; this is for dashboards).", ("model",)
        ).inc(nano_dkk / 1e9, tags={"model": model})


def engine_load(model: str, replica: str, queue: float, kv_cache_usage: float) -> None:
    tags = {"model": model, "replica": replica}
    _metric(
        "gauge", "anker_engine_queue", "vLLM waiting + running requests of an engine replica.", ("model", "replica")
    ).set(queue, tags=tags)
    _metric(
        "gauge", "anker_engine_kv_cache_usage", "KV-cache use of an engine replica (0-1).", ("model", "replica")
    ).set(kv_cache_usage, tags=tags)


def replicas(deployment: str, wanted: int, running: int) -> None:
    tags = {"deployment": deployment}
    _metric("gauge", "anker_replicas_wanted", "Replicas the autoscaling policy asks for.", ("deployment",)).set(
        wanted, tags=tags
    )
    _metric("gauge", "anker_replicas_running", "Replicas up and serving.", ("deployment",)).set(running, tags=tags)


def usage_pending(replica: str, pending: int) -> None:
    _metric(
        "gauge",
        "anker_usage_reports_pending",
        "Usage reports not yet in the ledger (per ingress replica).",
        ("replica",),
    ).set(pending, tags={"replica": replica})


def set_aside(reason: str, count: int) -> None:
    """Usage reports billing could not record and set aside (``usage_set_aside``), by reason code."""
    _metric(
        "counter", "anker_usage_set_aside", "Usage reports set aside, unbilled, for the operator.", ("reason",)
    ).inc(count, tags={"reason": reason})


def routed(model: str, decision: str, matched_blocks: int, blocks: int) -> None:
    """One routing decision of the engine request router (deployments/router.py): why the replica was chosen, and
    how many of the prompt's blocks the preferred replica already held."""
    _metric(
        "counter",
        "anker_router_decisions",
        "Engine routing decisions: prefix (longest cached prefix), no_match, overloaded, other_call.",
        ("model", "decision"),
    ).inc(1, tags={"model": model, "decision": decision})
    counter = _metric(
        "counter",
        "anker_router_prompt_blocks",
        "Prompt blocks routed, and those matched on a replica.",
        ("model", "kind"),
    )
    if blocks:
        counter.inc(blocks, tags={"model": model, "kind": "prompt"})
    if matched_blocks:
        counter.inc(matched_blocks, tags={"model": model, "kind": "matched"})
