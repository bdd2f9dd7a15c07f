"""Placement of the production profiles on a simulated multi-node Ray cluster (``ray.cluster_utils.Cluster``) whose
nodes carry fake GPUs and region labels: each profile's engine deployment, with its model loading replaced by
``PlacementProbeDouble``, must span the nodes and GPUs its TP x PP x DP says, stay inside its residency region,
leave a replica pending while the cluster is too small, and place it once a node is added.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from config.naming import REGION_LABEL
from config.schema import AnkerConfig
from config.settings import PROFILES_DIR, load_config
from deployments.builder import engine_options, engine_spec
from testkit.doubles import PlacementProbeDouble

GPU_NODE = {"num_cpus": 16, "num_gpus": 8, "object_store_memory": 80 * 1024 * 1024}


def profile(name: str) -> AnkerConfig:
    return load_config(PROFILES_DIR / f"qwen35-397b-{name}.yaml", {})


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    sim = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 4, "object_store_memory": 80 * 1024 * 1024, "labels": {"anker/role": "head"}},
    )
    sim.add_node(**GPU_NODE, labels={REGION_LABEL: "dk"})
    sim.add_node(**GPU_NODE, labels={REGION_LABEL: "se"})  # a GPU node outside the region
    ray.init(address=sim.address, namespace="placement-test", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 0})
    try:
        yield sim
    finally:
        serve.shutdown()
        ray.shutdown()
        sim.shutdown()


def deploy(config: AnkerConfig, app: str, **override: Any) -> None:
    from ray import serve
    from ray.serve.api import RunTarget

    model = config.models[0]
    options = {**engine_options(config, model), **override}
    if "num_replicas" in override:
        options.pop("autoscaling_config", None)
    probe = serve.deployment(PlacementProbeDouble).options(**options).bind(engine_spec(config, model))
    serve.run_many([RunTarget(probe, name=app, route_prefix=None)], wait_for_applications_running=False)


def replica_states(app: str) -> Counter[str]:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return Counter()
    return Counter({k: v for d in status.deployments.values() for k, v in d.replica_states.items()})


def wait_until(condition: Callable[[], bool], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


def placements(app: str) -> list[Counter[str]]:
    """Per replica placement group of ``app``: how many bundles sit on each node (by node label region)."""
    import ray
    from ray.util import placement_group_table

    regions = {n["NodeID"]: n.get("Labels", {}).get(REGION_LABEL, "-") for n in ray.nodes() if n["Alive"]}
    found = []
    for pg in placement_group_table().values():
        if app in (pg.get("name") or "") and pg["state"] == "CREATED":
            found.append(Counter(f"{node[:8]}:{regions.get(node, '?')}" for node in pg["bundles_to_node_id"].values()))
    return found


def unplaced(app: str) -> list[str]:
    """Why each of ``app``'s placement groups that Ray has not placed waits: its scheduling state, as Ray's GCS
    reports it (QUEUED and SCHEDULING_STARTED while it tries, NO_RESOURCES or INFEASIBLE once no node fits)."""
    from ray.util import placement_group_table

    return [
        str(pg["stats"]["scheduling_state"])
        for pg in placement_group_table().values()
        if app in (pg.get("name") or "") and pg["state"] == "PENDING"
    ]


def delete(app: str) -> None:
    from ray import serve

    serve.delete(app)
    wait_until(lambda: not placements(app), 60)


def test_tp8_fits_one_node_in_its_region_and_a_second_replica_waits_for_a_node(cluster: Any) -> None:
    config = profile("fp8-h200-tp8")
    deploy(config, "tp8", num_replicas=2)
    wait_until(lambda: replica_states("tp8").get("RUNNING", 0) == 1)
    # The other dk node does not exist yet, and the se node is outside the region: Ray's scheduler has tried the
    # second replica's placement group and found no node for it, so it waits.
    wait_until(lambda: unplaced("tp8") == ["NO_RESOURCES"] or unplaced("tp8") == ["INFEASIBLE"])
    states = replica_states("tp8")
    assert states["RUNNING"] == 1 and sum(states.values()) == 2, states
    [one] = placements("tp8")
    assert len(one) == 1 and next(iter(one)).endswith(":dk") and sum(one.values()) == 8

    cluster.add_node(**GPU_NODE, labels={REGION_LABEL: "dk"})  # scaling up works once a node is added
    wait_until(lambda: replica_states("tp8").get("RUNNING", 0) == 2)
    groups = placements("tp8")
    assert len(groups) == 2 and all(len(g) == 1 and sum(g.values()) == 8 for g in groups)
    assert len({next(iter(g)) for g in groups}) == 2 and all(next(iter(g)).endswith(":dk") for g in groups)
    delete("tp8")


def test_dp8_with_expert_parallel_takes_one_whole_node(cluster: Any) -> None:
    config = profile("fp8-h200-dp8-ep")
    assert engine_spec(config, config.models[0]).engine_args["data_parallel_size"] == 8
    deploy(config, "dp8ep")
    wait_until(lambda: replica_states("dp8ep").get("RUNNING", 0) == 1)
    [group] = placements("dp8ep")
    assert len(group) == 1 and sum(group.values()) == 8 and next(iter(group)).endswith(":dk")
    delete("dp8ep")


def test_tp8_pp2_spans_two_nodes_of_its_region(cluster: Any) -> None:
    config = profile("bf16-h100x2-tp8-pp2")
    options = engine_options(config, config.models[0])
    assert options["placement_group_strategy"] == "PACK" and len(options["placement_group_bundles"]) == 16
    assert options["ray_actor_options"]["num_gpus"] == 0  # every GPU goes to a vLLM worker of the Ray executor
    assert engine_spec(config, config.models[0]).engine_args["distributed_executor_backend"] == "ray"
    deploy(config, "tp8pp2")
    wait_until(lambda: replica_states("tp8pp2").get("RUNNING", 0) == 1)
    [group] = placements("tp8pp2")
    assert sorted(group.values()) == [8, 8] and all(node.endswith(":dk") for node in group)
    delete("tp8pp2")
