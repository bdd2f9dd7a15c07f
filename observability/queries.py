"""Every PromQL expression Anker's dashboards and alert rules use, in one place, so that one test can run them all
against a real Prometheus. Metric names are Ray's exports of ``observability.metrics`` (prefix ``ray_``).
"""

from __future__ import annotations

WINDOW = "5m"


def quantile(metric: str, q: float, window: str = WINDOW, by: str = "model") -> str:
    return f"histogram_quantile({q}, sum by (le, {by}) (rate(ray_{metric}_bucket[{window}])))"


TTFT_P50 = quantile("anker_time_to_first_token_seconds", 0.5)
TTFT_P95 = quantile("anker_time_to_first_token_seconds", 0.95)
INTER_TOKEN_P95 = quantile("anker_inter_token_latency_seconds", 0.95)
DURATION_P95 = quantile("anker_request_duration_seconds", 0.95)
REQUESTS_BY_STATUS = f"sum by (status_code) (rate(ray_anker_requests_total[{WINDOW}]))"
REQUESTS_BY_MODEL = f"sum by (model) (rate(ray_anker_requests_total[{WINDOW}]))"


def error_ratio(window: str) -> str:
    """Share of inference requests that ended in a server error (5xx) over ``window``."""
    return (
        f'(sum(rate(ray_anker_requests_total{{status_code=~"5.."}}[{window}])) or vector(0)) '
        f"/ clamp_min(sum(rate(ray_anker_requests_total[{window}])), 1e-9)"
    )


def slow_first_token_ratio(threshold_s: float, window: str) -> str:
    """Share of requests whose first token took longer than ``threshold_s`` (a bucket boundary) over ``window``."""
    return (
        f'1 - sum(rate(ray_anker_time_to_first_token_seconds_bucket{{le="{threshold_s:g}"}}[{window}])) '
        f"/ clamp_min(sum(rate(ray_anker_time_to_first_token_seconds_count[{window}])), 1e-9)"
    )


ERROR_RATIO = error_ratio(WINDOW)
ENGINE_QUEUE_BY_MODEL = "sum by (model) (ray_anker_engine_queue)"
ENGINE_QUEUE_PER_REPLICA = "avg by (model) (ray_anker_engine_queue)"
ENGINE_QUEUE_BY_REPLICA = "max by (model, replica) (ray_anker_engine_queue)"
KV_CACHE_BY_REPLICA = "max by (model, replica) (ray_anker_engine_kv_cache_usage)"
REPLICAS_WANTED = "max by (deployment) (ray_anker_replicas_wanted)"
REPLICAS_RUNNING = "max by (deployment) (ray_anker_replicas_running)"
USAGE_PENDING = "sum(ray_anker_usage_reports_pending)"
USAGE_SET_ASIDE_1H = "sum(increase(ray_anker_usage_set_aside_total[1h]))"
NODE_CPU = "avg by (instance) (ray_node_cpu_utilization)"
NODE_MEMORY = "sum by (instance) (ray_node_mem_used) / sum by (instance) (ray_node_mem_total)"
TOKENS_BY_KIND = f"sum by (model, kind) (rate(ray_anker_tokens_total[{WINDOW}]))"
TOKENS_PER_HOUR_BY_MODEL = "sum by (model) (increase(ray_anker_tokens_total[1h]))"
DKK_PER_HOUR_BY_MODEL = "sum by (model) (increase(ray_anker_billed_dkk_total[1h]))"
DKK_TODAY = "sum(increase(ray_anker_billed_dkk_total[1d]))"
CACHED_SHARE = (
    '(sum(rate(ray_anker_tokens_total{kind="cached"}[1h])) or vector(0)) '
    '/ clamp_min(sum(rate(ray_anker_tokens_total{kind=~"cached|uncached"}[1h])), 1e-9)'
)
