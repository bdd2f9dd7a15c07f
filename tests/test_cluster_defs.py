"""Cluster definitions generated from the production profiles: the committed files are what the profiles generate
(no drift), the RayService has what production needs (GPU-less head, autoscaler, GCS fault tolerance in Redis, token
auth, a dashboard closed to the outside, residency labels, multi-host replicas, pods that drain before they stop),
and the launcher config passes Ray's own schema.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from cluster import kuberay
from config.naming import REGION_LABEL, model_app_name
from config.placement import engine_placement
from config.settings import DEFAULT_PROFILE, PROFILES_DIR, load_config

ROOT = Path(__file__).resolve().parent.parent
PROFILES = sorted(PROFILES_DIR.glob("qwen35-397b-*.yaml"))
ANKER = str(Path(sys.executable).parent / "anker")
# Field names of KubeRay's ray.io/v1 API (RayServiceSpec, RayClusterSpec, HeadGroupSpec, WorkerGroupSpec) that the
# generator may use: a typo here would be silently ignored by Kubernetes, so the test refuses anything else.
RAYSERVICE_FIELDS = {"serveConfigV2", "rayClusterConfig"}
CLUSTER_FIELDS = {
    "rayVersion",
    "enableInTreeAutoscaling",
    "autoscalerOptions",
    "authOptions",
    "gcsFaultToleranceOptions",
    "headGroupSpec",
    "workerGroupSpecs",
}
HEAD_FIELDS = {"serviceType", "rayStartParams", "labels", "template"}
WORKER_FIELDS = {
    "groupName",
    "numOfHosts",
    "replicas",
    "minReplicas",
    "maxReplicas",
    "rayStartParams",
    "labels",
    "template",
}


def documents(profile: Path) -> dict[str, dict[str, Any]]:
    """The profile's generated documents by kind (network policies by name)."""
    text = (ROOT / "cluster" / "kuberay" / f"{profile.stem}.rayservice.yaml").read_text()
    docs = list(yaml.safe_load_all(text))
    return {d["metadata"]["name"] if d["kind"] == "NetworkPolicy" else d["kind"]: d for d in docs}


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_committed_definitions_are_what_the_profile_generates(profile: Path) -> None:
    for relative, content in kuberay.definitions(load_config(profile, {}), profile).items():
        assert (ROOT / "cluster" / relative).read_text() == content, f"{relative} drifted: run anker cluster-defs"
    check = subprocess.run(
        [ANKER, "cluster-defs", "--profile", str(profile), "--check"], capture_output=True, text=True, timeout=120
    )
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_pods_drain_before_they_stop(profile: Path) -> None:
    """Each pod's stop hook is an `anker drain` the CLI accepts (the head's drains, a worker's follows the head's),
    and Kubernetes waits for the whole drain before it kills the pod."""
    from cluster.cli import build_parser, cmd_drain

    config = load_config(profile, {})
    cluster = documents(profile)["RayService"]["spec"]["rayClusterConfig"]
    [workers] = cluster["workerGroupSpecs"]
    for group, follows in ((cluster["headGroupSpec"], False), (workers, True)):
        spec = group["template"]["spec"]
        assert spec["terminationGracePeriodSeconds"] > config.stack.drain_timeout_s + kuberay.FOLLOW_S
        [container] = spec["containers"]
        hook = container["lifecycle"]["preStop"]["exec"]["command"]
        assert hook[0] == "anker"
        args = build_parser().parse_args(hook[1:])
        assert args.func is cmd_drain and args.address == "auto" and not args.undo
        assert (args.follow is not None) == follows


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_rayservice_has_what_production_needs(profile: Path) -> None:
    config = load_config(profile, {})
    model = config.models[0]
    docs = documents(profile)
    service = docs["RayService"]
    assert service["apiVersion"] == "ray.io/v1" and set(service["spec"]) <= RAYSERVICE_FIELDS
    cluster = service["spec"]["rayClusterConfig"]
    assert set(cluster) <= CLUSTER_FIELDS and cluster["rayVersion"] == "2.60.0"
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["authOptions"] == {"mode": "token"}
    assert cluster["gcsFaultToleranceOptions"]["redisAddress"].startswith("redis://")
    assert "secretKeyRef" in cluster["gcsFaultToleranceOptions"]["redisPassword"]["valueFrom"]

    head = cluster["headGroupSpec"]
    assert set(head) <= HEAD_FIELDS and head["serviceType"] == "ClusterIP"
    assert head["rayStartParams"]["num-gpus"] == "0" and head["rayStartParams"]["port"] != "6379"
    assert all("nvidia.com/gpu" not in c["resources"]["limits"] for c in head["template"]["spec"]["containers"])

    [workers] = cluster["workerGroupSpecs"]
    assert set(workers) <= WORKER_FIELDS
    assert workers["numOfHosts"] == engine_placement(model).nodes
    assert (workers["minReplicas"], workers["maxReplicas"]) == (model.min_replicas, model.max_replicas)
    assert workers["labels"][REGION_LABEL] == "dk" == workers["template"]["spec"]["nodeSelector"][REGION_LABEL]
    [container] = workers["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == str(model.hardware.gpus_per_node)

    for group in [head, workers]:  # the key secret and the admin token outlive any pod (issue 15, hole 2)
        pod = group["template"]["spec"]
        [container] = pod["containers"]
        env = {e["name"]: e for e in container["env"]}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        mount = mounts[env["ANKER_SECRETS_DIR"]["value"]]
        assert mount["readOnly"] is True
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert volume["secret"]["secretName"] == "anker-secrets"

    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    apps = serve_config["applications"]
    assert [a["name"] for a in apps] == ["anker", *(model_app_name(m.name) for m in config.models)]
    assert {a["import_path"] for a in apps} == {"deployments.builder:app_from_args"}
    assert docs["ConfigMap"]["data"][profile.name] == profile.read_text()  # the cluster runs this very profile

    name = service["metadata"]["name"]
    deny = docs[f"{name}-default-deny"]["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": []}  # what is not admitted is denied
    ray_pods = docs[f"{name}-ray"]["spec"]
    assert ray_pods["podSelector"] == {"matchLabels": {"anker/service": name}}
    for group in [head, *cluster["workerGroupSpecs"]]:  # every Ray pod is one of them, so Ray's ports work
        assert group["template"]["metadata"]["labels"]["anker/service"] == name
    from_outside = [r for r in ray_pods["ingress"] if r["from"] != [{"podSelector": ray_pods["podSelector"]}]]
    assert all(r["ports"] == [{"port": config.ray.metrics_export_port}] for r in from_outside)
    head_policy = docs[f"{name}-head"]["spec"]
    dashboard_rule = next(r for r in head_policy["ingress"] if {"port": 8265} in r["ports"])
    [source] = dashboard_rule["from"]
    assert source == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}}}
    assert all({"port": 8265} not in r["ports"] for r in head_policy["ingress"] if r is not dashboard_rule)


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_launcher_config_passes_rays_schema(profile: Path) -> None:
    import ray.autoscaler

    launcher = yaml.safe_load((ROOT / "cluster" / "launcher" / f"{profile.stem}.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(launcher, schema)
    head_start = " ".join(launcher["head_start_ray_commands"])
    assert "--port=6380" in head_start and "6379" not in head_start
    assert "--dashboard-host=127.0.0.1" in head_start and "RAY_AUTH_MODE=token" in head_start
    assert f"{REGION_LABEL}=dk" in " ".join(launcher["worker_start_ray_commands"])


def test_the_rayservice_deploys_an_application_per_model_behind_haproxy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The RayService runs the control application at "/" and one application per model at its route prefix, each
    built by the same import path from the mounted profile, on pods whose Ray runs Serve's HAProxy through Anker's
    program; that program finds the served models in the profile alone."""
    from ray.serve import Application

    from deployments.builder import app_from_args
    from deployments.server import haproxy

    profile = DEFAULT_PROFILE
    config = load_config(profile, {})
    [*_, service] = [d for d in kuberay.rayservice_documents(config, profile) if d["kind"] == "RayService"]
    apps = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    assert [(a["name"], a["route_prefix"]) for a in apps] == [
        ("anker", "/"),
        ("model-qwen3-next-tiny", "/models/qwen3-next-tiny"),
        ("model-qwen3-moe-tiny", "/models/qwen3-moe-tiny"),
    ]
    for app in apps:
        args = {**app["args"], "config": str(profile)}  # the mount's path, here
        assert app["import_path"] == kuberay.APP_IMPORT_PATH
        assert isinstance(app_from_args(args), Application)
    with pytest.raises(ValueError, match="model-qwen3-moe-tiny"):
        app_from_args({"config": str(profile), "app": "model-nope"})

    cluster = service["spec"]["rayClusterConfig"]
    [container] = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_SERVE_HAPROXY_BINARY_PATH"].startswith("/")
    assert env["RAY_SERVE_HAPROXY_METRICS_PORT"] == str(config.server.haproxy_metrics_port)

    monkeypatch.delenv(haproxy.MODEL_MAP_ENV, raising=False)
    monkeypatch.setenv("ANKER_CONFIG", str(profile))
    served = haproxy._model_map_path(tmp_path).read_text()
    assert served == "qwen3-moe-tiny /models/qwen3-moe-tiny\nqwen3-next-tiny /models/qwen3-next-tiny\n"
