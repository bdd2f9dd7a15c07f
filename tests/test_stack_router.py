"""Prefix-aware routing on the local cluster: a second Anker application on the stack's Ray cluster serves
qwen3-next-tiny from two engine replicas; each turn of a multi-turn conversation lands on the replica that served the
turns before it (read from the engine span of the request's trace) and reports cached prompt tokens.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.conftest import ANKER, Stack
from tests.otlp import OtlpReceiver

pytestmark = pytest.mark.stack

APP, PREFIX, MODEL = "routing", "/routing", "qwen3-next-tiny"
READY_TIMEOUT_S = 600
SYSTEM = (
    "Du er en hjælpsom assistent for en dansk kommune. Svar kort og præcist, og henvis til de relevante regler, "
    "når borgeren spørger om affald, parkering, byggetilladelser eller åbningstider. "
) * 6


@dataclass(frozen=True)
class RoutedApp:
    base_url: str
    api_key: str


@pytest.fixture(scope="module")
def routed(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RoutedApp]:
    """The application of `anker up`, built from the same config with one model at two replicas and its own data
    folder (ledger, outbox), deployed beside the stack's under ``/routing``."""
    from ray import serve

    from cluster.config import load_config
    from cluster.local import connect
    from deployments.builder import build_app

    data_dir = tmp_path_factory.mktemp("routing-data")
    shutil.copytree(stack.data_dir / "models" / MODEL, data_dir / "models" / MODEL)
    env = {
        **stack.env,
        "ANKER_DATA_DIR": str(data_dir),
        "ANKER__MODELS__0__MIN_REPLICAS": "2",
        "ANKER__MODELS__0__MAX_REPLICAS": "2",
    }
    created = subprocess.run([ANKER, "keys", "create", "--tenant", "routing"], env=env, capture_output=True, text=True)
    assert created.returncode == 0, created.stderr
    config = load_config(environ=env)
    config = config.model_copy(update={"models": [m for m in config.models if m.name == MODEL]})
    assert config.models[0].router.policy == "prefix_aware" and config.models[0].min_replicas == 2

    connect(load_config(environ=stack.env))  # a driver on the stack's cluster (its Ray auth token)
    serve.run(build_app(config), name=APP, route_prefix=PREFIX)
    app = RoutedApp(f"{stack.base_url}{PREFIX}", created.stdout.strip().splitlines()[-1])
    try:
        wait_until_serving(app)
        yield app
    finally:
        serve.delete(APP)


def wait_until_serving(app: RoutedApp) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = ""
    while time.monotonic() < deadline:
        try:
            r = httpx.post(
                f"{app.base_url}/v1/chat/completions",
                json={"model": MODEL, "messages": [{"role": "user", "content": "hej"}], "max_tokens": 1},
                headers={"Authorization": f"Bearer {app.api_key}"},
                timeout=30,
            )
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(2)
    raise AssertionError(f"the routing app did not serve within {READY_TIMEOUT_S} s: {last}")


@dataclass(frozen=True)
class Turn:
    trace_id: str
    reply: str
    prompt_tokens: int
    cached_tokens: int


def ask(app: RoutedApp, messages: list[dict[str, str]]) -> Turn:
    trace_id = secrets.token_hex(16)
    r = httpx.post(
        f"{app.base_url}/v1/chat/completions",
        json={"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0},
        headers={
            "Authorization": f"Bearer {app.api_key}",
            "traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01",
        },
        timeout=120,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    usage = body["usage"]
    return Turn(
        trace_id,
        body["choices"][0]["message"]["content"],
        usage["prompt_tokens"],
        usage["prompt_tokens_details"]["cached_tokens"],
    )


def engine_replica(otlp: OtlpReceiver, trace_id: str, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for span in otlp.trace(trace_id):
            if span.name == "engine.generate":
                return str(span.attributes["anker.engine_replica"])
        time.sleep(0.5)
    raise AssertionError(f"no engine span for trace {trace_id}")


def test_a_multi_turn_conversation_keeps_landing_on_the_replica_that_holds_its_prefix(
    routed: RoutedApp, otlp: OtlpReceiver
) -> None:
    conversations: list[list[Turn]] = []
    for number in range(4):
        messages = [{"role": "system", "content": f"Samtale {number}. {SYSTEM}"}]
        turns = []
        for question in ("Hvornår tømmes skraldespanden?", "Og papircontaineren?", "Hvad med storskrald?"):
            messages.append({"role": "user", "content": question})
            turn = ask(routed, messages)
            turns.append(turn)
            messages.append({"role": "assistant", "content": turn.reply})
        conversations.append(turns)

    replicas = [[engine_replica(otlp, t.trace_id) for t in turns] for turns in conversations]
    for served_by in replicas:
        assert len(set(served_by)) == 1, f"a conversation moved between replicas: {replicas}"
    for turns in conversations:
        for later in turns[1:]:
            assert later.cached_tokens > 0, [(t.prompt_tokens, t.cached_tokens) for t in turns]
            assert later.cached_tokens < later.prompt_tokens
