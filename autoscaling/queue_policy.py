"""Queue-depth autoscaling of engine deployments: a Ray Serve custom autoscaling policy.

Each engine replica reports its vLLM queue (waiting + running requests) and KV-cache use through Serve's
``record_autoscaling_stats`` hook; this policy sizes the deployment to a target queue per replica, adds a replica when
one is out of KV cache, waits ``upscale_delay_s`` / ``downscale_delay_s`` of a steady wish before acting, and never
leaves [floor, ceiling], the floor at least 1 (the service is 24/7). It decides; it does not start or stop anything.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Protocol

QUEUE_METRIC = "engine_queue"  # waiting + running requests in one replica's vLLM scheduler
KV_CACHE_METRIC = "kv_cache_usage"  # 0..1, the replica's KV-cache blocks in use

_UP_SINCE = "anker_up_since"
_DOWN_SINCE = "anker_down_since"
_WISH = "anker_wish"


@dataclass(frozen=True)
class QueuePolicyConfig:
    target_queue_per_replica: float = 8.0
    max_kv_cache_usage: float = 0.90
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 120.0
    min_replicas: int = 1
    max_replicas: int = 1

    def __post_init__(self) -> None:
        if self.target_queue_per_replica <= 0:
            raise ValueError("target_queue_per_replica must be positive")
        if not 0 < self.max_kv_cache_usage <= 1:
            raise ValueError("max_kv_cache_usage must be in (0, 1]")
        if self.upscale_delay_s < 0 or self.downscale_delay_s < 0:
            raise ValueError("delays cannot be negative")
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError("need 1 <= min_replicas <= max_replicas: the floor never drops below 1")


@dataclass(frozen=True)
class Observation:
    """What the policy sees at one tick: the current target and each reporting replica's queue and KV-cache use."""

    now_s: float
    target_replicas: int
    queues: tuple[float, ...]
    kv_cache_usages: tuple[float, ...] = ()
    unassigned: float = 0.0  # requests waiting in Serve's handles for a replica (all replicas at their limit)
    running_replicas: int | None = None  # replicas up and serving; fewer than target while new ones start


def desired_replicas(config: QueuePolicyConfig, seen: Observation) -> int:
    """The replica count the load asks for now, before delays: enough replicas for the target queue each, plus one
    when a replica's KV cache is full (its queue will grow however short it looks), within [floor, ceiling]."""
    if not seen.queues:
        wish = seen.target_replicas  # no replica reports yet (starting up): hold
    else:
        wish = math.ceil((sum(seen.queues) + seen.unassigned) / config.target_queue_per_replica)
        if any(usage >= config.max_kv_cache_usage for usage in seen.kv_cache_usages):
            wish = max(wish, seen.target_replicas + 1)
    return min(config.max_replicas, max(config.min_replicas, 1, wish))


def decide(config: QueuePolicyConfig, seen: Observation, state: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """One tick: the replica count to ask Serve for, and the state for the next tick.

    A wish to scale must hold, in the same direction, for that direction's delay before it is acted on, and then
    the current wish is taken (a spike that has passed is not chased). A wish that flips direction or settles
    restarts both clocks, so flapping load changes nothing.
    """
    wish = desired_replicas(config, seen)
    current = min(config.max_replicas, max(config.min_replicas, 1, seen.target_replicas))
    kept = {k: v for k, v in state.items() if k not in (_UP_SINCE, _DOWN_SINCE)}
    starting = seen.running_replicas is not None and seen.running_replicas < current
    if wish == current or (wish < current and starting):
        # A scale-up in progress is not cancelled by a dip: an engine takes a minute to start, and the load that
        # asked for it is usually queued in front of the engines meanwhile.
        return current, kept
    clock, delay_s = (_UP_SINCE, config.upscale_delay_s) if wish > current else (_DOWN_SINCE, config.downscale_delay_s)
    since = state.get(clock)
    since = seen.now_s if since is None else float(since)
    if seen.now_s - since >= delay_s:
        return wish, kept
    kept[clock] = since
    return current, kept


class AutoscalingContextLike(Protocol):
    """The part of ``ray.serve.config.AutoscalingContext`` the policy reads."""

    @property
    def target_num_replicas(self) -> int: ...

    @property
    def running_replicas(self) -> Any: ...

    @property
    def aggregated_metrics(self) -> Any: ...

    @property
    def policy_state(self) -> dict[str, Any]: ...

    @property
    def current_time(self) -> float | None: ...


class QueueDepthPolicy:
    """The policy as Ray Serve calls it: a class-callable built once from ``policy_kwargs`` (the config's fields),
    then called with an ``AutoscalingContext`` every control-loop tick."""

    def __init__(self, **config: Any) -> None:
        self.config = QueuePolicyConfig(**config)

    def __call__(self, ctx: AutoscalingContextLike) -> tuple[int, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        running = set(ctx.running_replicas or ())
        queues = metrics.get(QUEUE_METRIC, {})
        usages = metrics.get(KV_CACHE_METRIC, {})
        unassigned = getattr(ctx, "total_queued_requests", None)
        seen = Observation(
            now_s=ctx.current_time if ctx.current_time is not None else time.time(),
            unassigned=float(unassigned() if callable(unassigned) else unassigned or 0.0),
            target_replicas=ctx.target_num_replicas,
            queues=tuple(float(v) for r, v in queues.items() if r in running),
            running_replicas=len(running),
            kv_cache_usages=tuple(float(v) for r, v in usages.items() if r in running),
        )
        wanted, state = decide(self.config, seen, dict(ctx.policy_state or {}))
        _report(getattr(ctx, "deployment_name", "?"), wanted, len(running))
        return wanted, state


def _report(deployment: str, wanted: int, running: int) -> None:
    """Replicas wanted vs running, as metrics (the policy runs in Serve's controller, where Ray metrics work)."""
    try:
        from observability import metrics
    except ImportError:  # the policy must decide even where Anker's package is not importable
        return
    metrics.replicas(deployment, wanted, running)


def serve_autoscaling_config(config: QueuePolicyConfig, look_back_period_s: float = 10.0) -> dict[str, Any]:
    """Ray Serve's ``autoscaling_config`` for an engine deployment run by this policy.

    Serve's own delays are 0: the policy keeps its own clocks, so that they are tested where they live.
    """
    return {
        "min_replicas": config.min_replicas,
        "initial_replicas": config.min_replicas,
        "max_replicas": config.max_replicas,
        "metrics_interval_s": 2.0,
        "look_back_period_s": look_back_period_s,
        "upscale_delay_s": 0.0,
        "downscale_delay_s": 0.0,
        "policy": {"policy_function": f"{__name__}:QueueDepthPolicy", "policy_kwargs": asdict(config)},
    }
