"""The second edition's request path, as `anker up` starts it with `stack.ingress: haproxy`: Ray Serve's HAProxy
direct ingress with Anker's model dispatch (deployments/server/haproxy.py), the control application at ``/``
(deployments/control.py) and a model's own application whose engine replica serves the OpenAI API itself
(deployments/server/replica.py) over a real vLLM, with its ingress request router (deployments/server/route.py).
Called with the official ``openai`` SDK at one base URL.

A stack of its own beside the session's (HAProxy is a cluster-wide switch, ``RAY_SERVE_ENABLE_HA_PROXY``, that the
session's stack does not use yet), with one model and its own ports, data and Ray folders; `anker down` stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
import yaml

from cluster.local import haproxy_dir
from config.schema import AnkerConfig
from config.settings import DEFAULT_PROFILE, load_config
from deployments.billing.service import BillingService, billing_spec
from deployments.server.requests import NO_STORAGE
from testkit.otlp import OtlpReceiver
from testkit.ports import free_port
from tests.conftest import ANKER, Stack, create_key
from tests.test_stack_drain import drain_lets_running_streams_finish_and_holds_until_undone
from tests.test_stack_metrics import samples
from tests.test_stack_tracing import CANARY, wait_for_trace
from tests.traffic import CLIENT_TIMEOUT_S, ledger_totals, stream_chat, wait_for_ledger

MODEL = "qwen3-moe-tiny"
READY_TIMEOUT_S = 420
BURST = 20  # well above the 6 calls a replica takes at once


@dataclass(frozen=True)
class Cluster:
    base_url: str
    env: dict[str, str]
    config: AnkerConfig
    billing: BillingService  # the same SQLite ledger as the stack's billing actor, as `anker keys` reaches it
    key: str

    @property
    def stack(self) -> Stack:
        """This stack as the session's stack tests see theirs, for the checks they share."""
        return Stack(self.base_url, self.key, self.env, self.config.data_dir, f"127.0.0.1:{self.config.ray.gcs_port}")


def _one_model_profile(root: Path) -> Path:
    """The local profile with only ``MODEL``: the session's stack runs both models' engines beside this one."""
    profile = yaml.safe_load(DEFAULT_PROFILE.read_text())
    profile["models"] = [m for m in profile["models"] if m["name"] == MODEL]
    path = root / "profile.yaml"
    path.write_text(yaml.safe_dump(profile))
    return path


@pytest.fixture(scope="module")
def cluster(tiny_models: dict[str, Path], otlp: OtlpReceiver) -> Iterator[Cluster]:
    # A short folder: Ray's Unix sockets live in it (their paths have at most 107 bytes).
    root = Path(tempfile.mkdtemp(prefix="akdi-", dir="/tmp"))
    shutil.copytree(tiny_models[MODEL], root / "data" / "models" / MODEL)
    env = {
        **os.environ,
        "ANKER_CONFIG": str(_one_model_profile(root)),
        "ANKER_DATA_DIR": str(root / "data"),
        "ANKER_PORT": str(free_port()),
        "ANKER__STACK__INGRESS": "haproxy",
        # A ceiling of two replicas gives the model its ingress request router (deployments/server/route.py); a
        # queue target no test reaches keeps it at one, so the suite starts no second engine.
        "ANKER__MODELS__0__MAX_REPLICAS": "2",
        "ANKER__MODELS__0__AUTOSCALING__TARGET_QUEUE_PER_REPLICA": "1000",
        # A replica takes 2 + 4 calls at once (deployments/server/observed.py::Capacity): a burst overflows it.
        "ANKER__STACK__ENGINE_MAX_ONGOING_REQUESTS": "2",
        "ANKER__STACK__ENGINE_MAX_QUEUED_REQUESTS": "4",
        "ANKER__SERVER__HAPROXY_METRICS_PORT": str(free_port()),
        "ANKER__SERVER__HAPROXY_STATS_PORT": str(free_port()),
        "ANKER__RAY__GCS_PORT": str(free_port()),
        "ANKER__RAY__NUM_CPUS": "4",
        "ANKER__RAY__DASHBOARD_PORT": str(free_port()),
        "ANKER__RAY__CLIENT_SERVER_PORT": str(free_port()),
        "ANKER__RAY__DASHBOARD_AGENT_LISTEN_PORT": str(free_port()),
        "ANKER__RAY__METRICS_EXPORT_PORT": str(free_port()),
        "ANKER__RAY__MIN_WORKER_PORT": "20000",
        "ANKER__RAY__MAX_WORKER_PORT": "20999",
        "ANKER__RAY__TEMP_DIR": str(root / "ray"),
        **otlp.env(),
    }
    config = load_config(environ=env)
    billing: BillingService | None = None
    try:
        key = create_key(env, "direct")  # before the stack starts, as an operator may
        billing = BillingService(billing_spec(config))
        up = subprocess.run([ANKER, "up", "--detach"], env=env, capture_output=True, text=True, timeout=READY_TIMEOUT_S)
        assert up.returncode == 0, f"{up.stdout[-3000:]}\n{up.stderr[-3000:]}"
        yield Cluster(f"http://127.0.0.1:{config.server.port}", env, config, billing, key)
    finally:
        down = subprocess.run([ANKER, "down"], env=env, capture_output=True, text=True, timeout=180)
        left = _outlives_the_cluster(config)
        if billing is not None:
            billing.ledger.dispose()
        shutil.rmtree(root, ignore_errors=True)
    assert down.returncode == 0, f"{down.stdout[-3000:]}\n{down.stderr[-3000:]}"
    assert not left, f"HAProxy outlived its Ray cluster (killed now): {left}"
    assert not haproxy_dir(config).exists(), "`anker down` left HAProxy's folder behind"


def _haproxies(config: AnkerConfig) -> list[psutil.Process]:
    """The HAProxy processes that run this stack's patched config (Ray puts it in a folder per node)."""
    folder = f"{haproxy_dir(config)}/"
    return [
        process
        for process in psutil.process_iter(["name", "cmdline"])
        if process.info["name"] == "haproxy"
        and any(arg.startswith(folder) and arg.endswith(".cfg.anker") for arg in process.info["cmdline"] or [])
    ]


def _outlives_the_cluster(config: AnkerConfig) -> list[int]:
    """The HAProxy processes still running 10 s after the cluster stopped, killed so that they free their ports."""
    deadline = time.monotonic() + 10
    while (left := _haproxies(config)) and time.monotonic() < deadline:
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


def _haproxy_listeners(config: AnkerConfig) -> list[tuple[str, int]]:
    return [
        (c.laddr.ip, c.laddr.port)
        for process in _haproxies(config)
        for c in process.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN
    ]


def _scrape(cluster: Cluster) -> str:
    """What Ray's metrics agent exports on this stack's node."""
    return httpx.get(f"http://127.0.0.1:{cluster.config.ray.metrics_export_port}/metrics", timeout=10).text


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
    # What no model's application answers, the control application at "/" does, at the same base URL.
    assert [m.id for m in client.models.list().data] == [MODEL]
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hej"}])
    assert unknown.value.code == "model_not_found" and "no-such-model" not in str(unknown.value.body)
    with pytest.raises(openai.NotFoundError) as stored:
        client.responses.retrieve("resp_1")
    assert stored.value.message.endswith(NO_STORAGE)
    assert httpx.get(f"{cluster.base_url}/healthz", timeout=10).json()["models"] == {MODEL: {"ready": True}}


def test_haproxy_listens_on_loopback_only(cluster: Cluster) -> None:
    _wait_for_the_model(cluster)
    listeners = _haproxy_listeners(cluster.config)
    assert listeners, "no HAProxy process runs the patched config"
    assert {ip for ip, _ in listeners} == {"127.0.0.1"}, listeners


def test_a_call_is_one_trace_and_is_measured(cluster: Cluster, otlp: OtlpReceiver) -> None:
    """The replica's door traces each call (its server span joins the client's ``traceparent``; admission and the
    billing actor's span below it) and measures it in Anker's metrics, with neither a prompt nor a key in them."""
    _wait_for_the_model(cluster)
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    body = {"model": MODEL, "messages": [{"role": "user", "content": CANARY}], "max_tokens": 6, "stream": True}
    headers = {**_auth(cluster), "traceparent": f"00-{trace_id}-{parent_id}-01"}
    with httpx.stream("POST", f"{cluster.base_url}/v1/chat/completions", json=body, headers=headers, timeout=120) as r:
        assert r.status_code == 200
        streamed = "".join(r.iter_lines())
    spans = wait_for_trace(otlp, trace_id, {"POST /v1/chat/completions", "admission", "billing.admit"})
    by_name = {s.name: s for s in spans}
    server = by_name["POST /v1/chat/completions"]
    assert server.parent_span_id == parent_id and server.service == f"anker-engine-{MODEL}"
    assert server.attributes["http.response.status_code"] == 200
    assert by_name["admission"].parent_span_id == server.span_id
    assert by_name["billing.admit"].parent_span_id == by_name["admission"].span_id
    assert by_name["billing.admit"].service == "anker-billing"
    for s in spans:
        assert CANARY not in s.name + repr(s.attributes)
    assert CANARY not in streamed

    with pytest.raises(openai.NotFoundError):  # answered by the control application, for no model
        openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key=cluster.key, max_retries=0).chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hej"}]
        )
    wanted = {
        "ray_anker_time_to_first_token_seconds_bucket",
        "ray_anker_inter_token_latency_seconds_bucket",
        "ray_anker_request_duration_seconds_bucket",
        "ray_anker_requests_total",
        "ray_anker_tokens_total",
        "ray_anker_engine_queue",
        "ray_anker_usage_reports_pending",
    }

    def missing(text: str) -> set[str]:
        absent = {family for family in wanted if not samples(text, family)}
        requests = [labels for labels, v in samples(text, "ray_anker_requests_total")]
        if not any(labels["status_code"] == "200" and labels["model"] == MODEL for labels in requests):
            absent.add("a 200 of the model")
        if not any(labels["status_code"] == "404" and labels["model"] == "-" for labels in requests):
            absent.add("a 404 of no model")
        return absent

    # Workers push their metrics to the node's agent every few seconds: poll until this traffic shows.
    deadline = time.monotonic() + 90
    text = _scrape(cluster)
    while missing(text) and time.monotonic() < deadline:
        time.sleep(2)
        text = _scrape(cluster)
    assert not missing(text), missing(text)
    for line in text.splitlines():
        if line.startswith("ray_anker_"):
            assert "tenant" not in line and "ank_" not in line and CANARY not in line


def test_haproxy_asks_the_models_router_which_replica_holds_the_prompts_prefix(cluster: Cluster) -> None:
    """Every API request to the model goes through its ingress request router: HAProxy's Lua asks it at
    /internal/route with the body, and it picks the replica by the prompt's blocks (a repeat of a prefix: the
    replica that has it)."""
    _wait_for_the_model(cluster)
    config = next(haproxy_dir(cluster.config).rglob("*.cfg.anker")).read_text()
    assert "lua.route_via_ingress_request_router" in config, "HAProxy's config has no ingress request router"

    def decisions() -> dict[str, float]:
        text = _scrape(cluster)
        found = samples(text, "ray_anker_router_decisions_total")
        return {labels["decision"]: value for labels, value in found if labels["model"] == MODEL}

    before = decisions().get("prefix", 0.0)
    client = openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key=cluster.key, max_retries=0)
    manual = "Du svarer på spørgsmål om havnens regler. " * 40
    cached = []
    for question in ("Hvornår åbner slusen?", "Hvor ligger færgen?"):
        answer = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "system", "content": manual}, {"role": "user", "content": question}],
            max_tokens=1,
        )
        assert answer.usage is not None and answer.usage.prompt_tokens_details is not None
        cached.append(answer.usage.prompt_tokens_details.cached_tokens or 0)
    assert cached[1] > 0, cached
    # Workers push their metrics to the node's agent every few seconds: poll until the router's pick shows.
    deadline = time.monotonic() + 90
    while decisions().get("prefix", 0.0) <= before and time.monotonic() < deadline:
        time.sleep(2)
    assert decisions().get("prefix", 0.0) > before, decisions()


async def test_a_burst_beyond_what_the_replica_takes_is_refused_at_once_in_openais_shape(cluster: Cluster) -> None:
    """Back-pressure on the second edition: the replica takes 6 calls at once; the rest of a burst gets 503
    ``engine_overloaded`` with Retry-After at once, what it took is served, and the ledger bills what clients were
    told."""
    _wait_for_the_model(cluster)
    key = create_key(cluster.env, "burst")
    before = ledger_totals(cluster.base_url, key)
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S) as client:
        outcomes = await asyncio.gather(
            *(stream_chat(client, cluster.base_url, key, MODEL, f"Spørgsmål nummer {i}?", 48) for i in range(BURST))
        )
    served = [o for o in outcomes if o.status == 200]
    refused = [o for o in outcomes if o.status == 503]
    assert len(served) + len(refused) == BURST, [o.status for o in outcomes]  # no timeouts, no other answers
    assert len(served) >= 6 and refused, f"{len(served)} served, {len(refused)} refused"
    for outcome in refused:
        assert (outcome.error_code, outcome.error_type, outcome.retry_after) == (
            "engine_overloaded",
            "service_unavailable_error",
            str(cluster.config.stack.overload_retry_after_s),
        )
    assert all(o.done and o.usage is not None and o.usage["completion_tokens"] > 0 for o in served)
    billed, expected = wait_for_ledger(cluster.base_url, key, before, list(outcomes))
    assert billed == expected


def test_a_drain_lets_the_replicas_streams_finish_and_holds_until_undone(cluster: Cluster) -> None:
    """The drain (deployments/drain.py) on the second edition: the model's engine replicas and the control
    application drain as the first edition's ingress does, and `anker drain` waits for the replicas' streams and
    usage reports."""
    _wait_for_the_model(cluster)
    drain_lets_running_streams_finish_and_holds_until_undone(cluster.stack)
