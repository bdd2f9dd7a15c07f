"""The request path, as `anker up` starts it: Ray Serve's HAProxy direct ingress with Anker's
model dispatch (deployments/server/haproxy.py), the control application at ``/`` (deployments/control.py) and each
model's own application whose engine replica serves the OpenAI API itself (deployments/server/replica.py) over a real
vLLM, with its ingress request router (deployments/server/route.py) where the model may scale out. Called with the
official ``openai`` SDK at one base URL, on the session's stack.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import psutil
import pytest

from cluster.local import haproxy_dir
from deployments.billing.service import BillingService, billing_spec
from deployments.server.haproxy import MARKER
from deployments.server.requests import NO_STORAGE
from tests.conftest import AUTOSCALED_MODEL, MODELS, Stack, haproxies
from tests.test_stack_metrics import samples, scrape
from tests.test_stack_tracing import CANARY

pytestmark = pytest.mark.stack

MODEL = AUTOSCALED_MODEL  # it may scale out: it has an ingress request router


TENANT = "direct"


@pytest.fixture(scope="module")
def billing(stack: Stack) -> Iterator[BillingService]:
    """The stack's ledger, as `anker keys` reaches it."""
    service = BillingService(billing_spec(stack.config))
    yield service
    service.ledger.dispose()


@pytest.fixture(scope="module")
def key(stack: Stack) -> str:
    return stack.new_key(TENANT)


def _haproxy_listeners(stack: Stack) -> list[tuple[str, int]]:
    return [
        (c.laddr.ip, c.laddr.port)
        for process in haproxies(stack.config)
        for c in process.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN
    ]


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _ledger_row(billing: BillingService, usage_id: str | None = None, timeout_s: float = 30) -> dict[str, Any]:
    """The tenant's newest ledger row once a replica's outbox has delivered it (other than ``usage_id``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = sorted(billing.ledger.events(TENANT), key=lambda row: row["finished_at"])
        if rows and rows[-1]["request_id"] != usage_id:
            return rows[-1]
        time.sleep(0.2)
    raise AssertionError(f"no new ledger row within {timeout_s:g} s")


def test_one_base_url_reaches_the_models_own_replica_through_haproxy(
    stack: Stack, key: str, billing: BillingService
) -> None:
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hej"}], max_tokens=1)
    before = _ledger_row(billing)["request_id"]
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
    row = _ledger_row(billing, before)
    assert (row["prompt_tokens"], row["completion_tokens"], row["status"]) == (usage.prompt_tokens, 24, "ok")
    stranger = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="sk-anker-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hej"}], max_tokens=1)
    # What no model's application answers, the control application at "/" does, at the same base URL.
    assert sorted(m.id for m in client.models.list().data) == sorted(MODELS)
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hej"}])
    assert unknown.value.code == "model_not_found" and "no-such-model" not in str(unknown.value.body)
    with pytest.raises(openai.NotFoundError) as stored:
        client.responses.retrieve("resp_1")
    assert stored.value.message.endswith(NO_STORAGE)
    assert httpx.get(f"{stack.base_url}/healthz", timeout=10).json()["models"] == {m: {"ready": True} for m in MODELS}


def test_haproxy_listens_on_loopback_only(stack: Stack) -> None:
    listeners = _haproxy_listeners(stack)
    # Found by the config path Ray gave it, as Ray's HAProxy manager finds the processes it stops after a reload.
    assert listeners, "no HAProxy process runs with the config path Ray gave it"
    assert {ip for ip, _ in listeners} == {"127.0.0.1"}, listeners


def test_a_call_is_measured_with_no_prompt_or_key_in_any_label(stack: Stack, key: str) -> None:
    """The replica's door measures each call in Anker's metrics, and the control application the calls that reach
    no model, with neither a prompt nor a key in them."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": CANARY}], "max_tokens": 6, "stream": True}
    with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body, headers=_auth(key), timeout=120) as r:
        assert r.status_code == 200
        assert CANARY not in "".join(r.iter_lines())
    with pytest.raises(openai.NotFoundError):  # answered by the control application, for no model
        openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0).chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hej"}]
        )

    def missing(text: str) -> set[str]:
        requests = [labels for labels, v in samples(text, "ray_anker_requests_total")]
        absent = set()
        if not any(labels["status_code"] == "200" and labels["model"] == MODEL for labels in requests):
            absent.add("a 200 of the model")
        if not any(labels["status_code"] == "404" and labels["model"] == "-" for labels in requests):
            absent.add("a 404 of no model")
        return absent

    # Workers push their metrics to the node's agent every few seconds: poll until this traffic shows.
    deadline = time.monotonic() + 90
    text = scrape(stack)
    while missing(text) and time.monotonic() < deadline:
        time.sleep(2)
        text = scrape(stack)
    assert not missing(text), missing(text)
    for line in text.splitlines():
        if line.startswith("ray_anker_"):
            assert "tenant" not in line and "ank_" not in line and CANARY not in line


def test_haproxy_asks_the_models_router_which_replica_holds_the_prompts_prefix(stack: Stack, key: str) -> None:
    """Every API request to a model that may scale out goes through its ingress request router: HAProxy's Lua asks
    it at /internal/route with the body, and it picks the replica by the prompt's blocks (a repeat of a prefix: the
    replica that has it)."""
    config = next(haproxy_dir(stack.config).rglob("haproxy.cfg")).read_text()
    assert "lua.route_via_ingress_request_router" in config, "HAProxy's config has no ingress request router"
    assert MARKER in config.split("\n"), "Anker's dispatch is not in the config HAProxy runs"

    def decisions() -> dict[str, float]:
        found = samples(scrape(stack), "ray_anker_router_decisions_total")
        return {labels["decision"]: value for labels, value in found if labels["model"] == MODEL}

    before = decisions().get("prefix", 0.0)
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
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
