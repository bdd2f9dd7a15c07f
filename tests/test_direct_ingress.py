"""The second edition's request path on a Ray cluster of its own: Ray Serve's HAProxy direct ingress, Anker's
model dispatch in it (deployments/server/haproxy.py), and the engine replica serving the OpenAI API itself
(deployments/server/replica.py) over a real vLLM. Called with the official ``openai`` SDK at one base URL.

Its own cluster because HAProxy is a cluster-wide switch (``RAY_SERVE_ENABLE_HA_PROXY``) that the session's stack
does not use yet. Stopped as ``anker down`` stops a cluster: SIGTERM to ``ray start --block``, never ``ray stop``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from config.naming import model_route_prefix
from deployments.billing.governance import Actor
from deployments.billing.service import BillingService, BillingSpec
from deployments.server.haproxy import MODEL_MAP_ENV, model_map
from testkit.ports import free_port
from tests.inprocess import PRICES

MODEL = "qwen3-moe-tiny"
READY_TIMEOUT_S = 300
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Cluster:
    base_url: str
    env: dict[str, str]
    head: subprocess.Popen[bytes]
    root: Path
    billing: BillingService  # the same SQLite ledger as the cluster's billing actor, as `anker keys` reaches it
    key: str


def billing_spec(root: Path) -> BillingSpec:
    return BillingSpec(root / "billing", None, {MODEL: PRICES}, default_rpm=600, default_tpm=2_000_000)


def _deploy_script(model_path: Path, gcs: str, http_port: int, root: Path) -> str:
    """A driver that starts Serve (HAProxy, from the cluster's environment) and deploys the model's application:
    its engine replica (the ingress) and, until the control application exists, its own billing actor."""
    return textwrap.dedent(
        f"""
        import ray
        from pathlib import Path
        from ray import serve
        from deployments.billing.actor import Billing
        from deployments.engine import EngineSpec
        from deployments.server.replica import EngineServer, ReplicaSpec
        from deployments.server.vllm_layer import ServingSpec
        from config.naming import model_route_prefix
        from tests.test_direct_ingress import billing_spec

        ray.init(address={gcs!r}, namespace="serve", log_to_driver=False)
        serve.start(http_options={{"host": "127.0.0.1", "port": {http_port}}})
        spec = ServingSpec(
            EngineSpec({MODEL!r}, __import__("pathlib").Path({str(model_path)!r}), 2048, 1, 1,
                       {{"dtype": "bfloat16", "enforce_eager": True, "max_num_seqs": 8}}),
            reasoning_parser="qwen3", tool_call_parser="qwen3_coder",
        )
        cards = ({{"id": {MODEL!r}, "object": "model", "created": 0, "owned_by": "anker"}},)
        env = {{
            "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_WORKER_MULTIPROC_METHOD": "spawn", "TOKENIZERS_PARALLELISM": "false"
        }}
        replica = ReplicaSpec(spec, cards, "dk", 1024 * 1024, usage_spool_dir=Path({str(root / "outbox")!r}))
        billing = Billing.options(ray_actor_options={{"num_cpus": 0.5}}).bind(billing_spec(Path({str(root)!r})))
        app = EngineServer.options(
            name="EngineServer-{MODEL}", ray_actor_options={{"num_cpus": 1, "runtime_env": {{"env_vars": env}}}}
        ).bind(replica, billing)
        serve.run(app, name={MODEL!r}, route_prefix=model_route_prefix({MODEL!r}), blocking=False)
        """
    )


def _wait_for_gcs(head: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert head.poll() is None, f"ray start exited with {head.returncode}: {log.read_text()[-2000:]}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise AssertionError(f"Ray's GCS did not listen on {port} within 120 s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def cluster(tiny_models: dict[str, Path]) -> Iterator[Cluster]:
    # A short folder: Ray's and HAProxy's Unix sockets live in it (their paths have at most 107 and 97 bytes, and
    # Ray adds a 56-character folder for HAProxy's).
    root = Path(tempfile.mkdtemp(prefix="akdi-", dir="/tmp"))
    token = root / "ray_auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    (root / "h").mkdir()
    (root / "models.map").write_text(model_map({MODEL: model_route_prefix(MODEL)}))
    http_port, gcs_port = free_port(), free_port()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(BIN / "anker-haproxy"),
        MODEL_MAP_ENV: str(root / "models.map"),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(root / "h" / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(root / "h" / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(root / "h"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(root / "h" / "server-state"),
    }
    billing: BillingService | None = None
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--disable-usage-stats",
            f"--port={gcs_port}",
            "--num-cpus=4",
            "--num-gpus=0",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            "--min-worker-port=20000",
            "--max-worker-port=20999",
            f"--temp-dir={root / 'ray'}",
        ],
        env=env,
        stdout=(root / "head.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_for_gcs(head, gcs_port, root / "head.log")
        gcs = f"127.0.0.1:{gcs_port}"
        billing = BillingService(billing_spec(root))  # migrates the ledger before the actor opens it
        _, key = billing.governance.create_key(Actor.operator("test"), "direct")
        driver = _deploy_script(tiny_models[MODEL], gcs, http_port, root)
        deployed = subprocess.run(
            [sys.executable, "-c", driver], env=env, capture_output=True, text=True, timeout=READY_TIMEOUT_S
        )
        assert deployed.returncode == 0, deployed.stderr[-3000:]
        yield Cluster(f"http://127.0.0.1:{http_port}", env, head, root, billing, key)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        left = _outlives_the_cluster(root)
        if billing is not None:
            billing.ledger.dispose()
        shutil.rmtree(root, ignore_errors=True)
    assert not left, f"HAProxy outlived its Ray cluster (killed now): {left}"


def _haproxies(root: Path) -> list[psutil.Process]:
    """The HAProxy processes that run this cluster's patched config (Ray puts it in a folder per node)."""
    folder = f"{root / 'h'}/"
    return [
        process
        for process in psutil.process_iter(["name", "cmdline"])
        if process.info["name"] == "haproxy"
        and any(arg.startswith(folder) and arg.endswith(".cfg.anker") for arg in process.info["cmdline"] or [])
    ]


def _outlives_the_cluster(root: Path) -> list[int]:
    """The HAProxy processes still running 10 s after the cluster stopped, killed so that they free their ports."""
    deadline = time.monotonic() + 10
    while (left := _haproxies(root)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for process in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    return [process.pid for process in left]


def _wait_for_the_model(cluster: Cluster) -> None:
    """Until the model's replica answers through HAProxy (its engine starts after the deploy returns)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    seen: list[str] = []
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hej"}], "max_tokens": 1}
    while time.monotonic() < deadline:
        try:
            r = httpx.post(f"{cluster.base_url}/v1/chat/completions", json=body, headers=_auth(cluster), timeout=30)
            if r.status_code == 200:
                return
            seen.append(f"{r.status_code} {r.text[:80]}")
        except httpx.HTTPError as exc:
            seen.append(type(exc).__name__)
        time.sleep(2)
    raise AssertionError(f"{MODEL} did not answer through HAProxy within {READY_TIMEOUT_S} s: {seen[-5:]}")


def _haproxy_listeners(root: Path) -> list[tuple[str, int]]:
    return [
        (c.laddr.ip, c.laddr.port)
        for process in _haproxies(root)
        for c in process.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN
    ]


def _auth(cluster: Cluster) -> dict[str, str]:
    return {"Authorization": f"Bearer {cluster.key}"}


def _ledger_row(cluster: Cluster, usage_id: str | None = None, timeout_s: float = 30) -> dict[str, Any]:
    """The ledger's newest row once the replica's outbox has delivered it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = sorted(cluster.billing.ledger.events("direct"), key=lambda row: row["finished_at"])
        if rows and rows[-1]["request_id"] != usage_id:
            return rows[-1]
        time.sleep(0.2)
    raise AssertionError(f"no new ledger row within {timeout_s:g} s")


def test_one_base_url_reaches_the_models_own_replica_through_haproxy(cluster: Cluster) -> None:
    _wait_for_the_model(cluster)
    before = _ledger_row(cluster)["request_id"]  # the warm-up's
    client = openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key=cluster.key, max_retries=0)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Fortæl om havnen i Esbjerg."}],
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    chunks = list(stream)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 24
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 1
    # Billed once, by the replica itself, as the client was told.
    row = _ledger_row(cluster, before)
    assert (row["prompt_tokens"], row["completion_tokens"], row["status"]) == (usage.prompt_tokens, 24, "ok")
    stranger = openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key="sk-anker-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hej"}], max_tokens=1)
    r = httpx.post(
        f"{cluster.base_url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hej"}], "model": "no-such-model"},
        headers=_auth(cluster),
        timeout=30,
    )
    # No control application yet: HAProxy's own 404 for a path no application serves.
    assert r.status_code == 404, r.text


def test_haproxy_listens_on_loopback_only(cluster: Cluster) -> None:
    _wait_for_the_model(cluster)
    listeners = _haproxy_listeners(cluster.root)
    assert listeners, "no HAProxy process runs the patched config"
    assert {ip for ip, _ in listeners} == {"127.0.0.1"}, listeners
