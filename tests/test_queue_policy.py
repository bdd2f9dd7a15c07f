"""The queue-depth autoscaling policy, driven with recorded metric sequences (step, spike, slow ramp, flapping, a
full KV cache) tick by tick, as Serve's control loop would; and once through Ray Serve's own ``AutoscalingContext``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from autoscaling.queue_policy import (
    KV_CACHE_METRIC,
    QUEUE_METRIC,
    Observation,
    QueueDepthPolicy,
    QueuePolicyConfig,
    decide,
    desired_replicas,
)

CONFIG = QueuePolicyConfig(
    target_queue_per_replica=8, upscale_delay_s=10, downscale_delay_s=60, min_replicas=1, max_replicas=4
)
TICK_S = 1.0


def run(
    queues_per_tick: Sequence[float],
    config: QueuePolicyConfig = CONFIG,
    kv_per_tick: Sequence[float] | None = None,
    start: int = 1,
) -> list[int]:
    """Feeds one total queue per tick (split evenly over the current replicas); returns the decision of each tick."""
    replicas, state, decisions = start, {}, []
    for tick, total in enumerate(queues_per_tick):
        per_replica = tuple(total / replicas for _ in range(replicas))
        kv = tuple(kv_per_tick[tick] for _ in range(replicas)) if kv_per_tick else ()
        replicas, state = decide(config, Observation(tick * TICK_S, replicas, per_replica, kv), state)
        decisions.append(replicas)
    return decisions


def test_a_step_scales_up_after_the_up_delay_and_down_after_the_down_delay() -> None:
    decisions = run([2.0] * 5 + [30.0] * 20 + [2.0] * 80)
    assert decisions[:15] == [1] * 15  # the step at tick 5 must last 10 s
    assert decisions[15] == 4  # ceil(30 / 8) = 4, at once, not one by one
    assert set(decisions[15:25]) == {4}
    assert decisions[25 + 59] == 4 and decisions[25 + 60] == 1  # 60 s of low load, then down to what it needs


def test_a_short_spike_changes_nothing() -> None:
    assert set(run([2.0] * 5 + [100.0] * 5 + [2.0] * 30)) == {1}


def test_a_slow_ramp_adds_replicas_as_the_queue_grows() -> None:
    decisions = run([i * 0.5 for i in range(120)])  # +0.5 queued requests per second
    assert decisions == sorted(decisions)  # never down while load only grows
    assert decisions[-1] == 4 and decisions[0] == 1
    first_up = decisions.index(2)
    assert first_up >= 17 + 10  # the queue first needs 2 replicas at tick 17, then the wish must hold 10 s


def test_flapping_load_never_moves_the_deployment() -> None:
    assert set(run([30.0, 2.0] * 60)) == {1}
    assert set(run([2.0, 30.0] * 60, start=2)) == {2}


def test_floor_and_ceiling_hold() -> None:
    assert set(run([1000.0] * 60)) <= {1, 4} and run([1000.0] * 60)[-1] == 4
    assert run([0.0] * 200, start=4)[-1] == 1  # idle: down to the floor, never to 0
    floor2 = QueuePolicyConfig(min_replicas=2, max_replicas=3, upscale_delay_s=0, downscale_delay_s=0)
    assert run([0.0] * 5, floor2, start=1) == [2] * 5  # a target below the floor is lifted at once
    with pytest.raises(ValueError):
        QueuePolicyConfig(min_replicas=0, max_replicas=1)


def test_a_full_kv_cache_asks_for_one_more_replica_even_with_a_short_queue() -> None:
    decisions = run([4.0] * 30, kv_per_tick=[0.95] * 30)
    assert decisions[9] == 1 and decisions[10] == 2 and decisions[-1] == 3  # +1 per full delay while still full


def test_a_dip_does_not_cancel_a_replica_that_is_still_starting() -> None:
    starting = Observation(0.0, 2, (1.0,), running_replicas=1)  # target 2, one up, a short queue
    replicas, state = decide(CONFIG, starting, {})
    for t in range(1, 200):
        replicas, state = decide(CONFIG, Observation(float(t), replicas, (1.0,), running_replicas=1), state)
    assert replicas == 2  # held while the second replica starts
    up = Observation(200.0, 2, (0.5, 0.5), running_replicas=2)
    replicas, state = decide(CONFIG, up, state)
    for t in range(201, 262):
        replicas, state = decide(CONFIG, Observation(float(t), replicas, (0.5, 0.5), running_replicas=2), state)
    assert replicas == 1  # once it runs, the usual down delay applies


def test_no_reports_holds_the_current_target() -> None:
    assert desired_replicas(CONFIG, Observation(0.0, 3, ())) == 3


def test_requests_waiting_in_serve_handles_count_as_queue() -> None:
    assert desired_replicas(CONFIG, Observation(0.0, 1, (8.0,), (), unassigned=17.0)) == 4


def test_the_policy_reads_ray_serves_autoscaling_context() -> None:
    """Through Ray's real context type: metrics keyed by replica id, stale replicas ignored, state carried."""
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve.config import AutoscalingContext

    deployment = DeploymentID(name="Engine-qwen3-moe-tiny", app_name="anker")
    a, b, gone = (ReplicaID(n, deployment) for n in ("a", "b", "gone"))
    policy = QueueDepthPolicy(**{**CONFIG.__dict__, "upscale_delay_s": 5.0})

    def context(now: float, state: dict[str, Any]) -> AutoscalingContext:
        return AutoscalingContext(
            deployment_id=deployment,
            deployment_name=deployment.name,
            app_name="anker",
            current_num_replicas=2,
            target_num_replicas=2,
            running_replicas=[a, b],
            total_num_requests=0.0,
            total_queued_requests=0.0,
            aggregated_metrics={QUEUE_METRIC: {a: 20.0, b: 12.0, gone: 500.0}, KV_CACHE_METRIC: {a: 0.1, b: 0.2}},
            raw_metrics=None,
            capacity_adjusted_min_replicas=1,
            capacity_adjusted_max_replicas=4,
            policy_state=state,
            last_scale_up_time=None,
            last_scale_down_time=None,
            current_time=now,
            config=None,
        )

    replicas, state = policy(context(100.0, {}))
    assert replicas == 2 and state  # wants 4 (32 queued / 8), waits
    replicas, state = policy(context(105.0, state))
    assert replicas == 4 and not state
