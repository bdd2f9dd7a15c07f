"""Prefix-aware routing on the local cluster: the second stack (conftest's ``second_app``) serves qwen3-next-tiny
from two engine replicas, so HAProxy asks the model's ingress request router where each request goes; each turn of a
multi-turn conversation lands on the replica that served the turns before it (read from the replica's server span of
the request's trace) and reports cached prompt tokens.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

import httpx
import pytest

from testkit.otlp import OtlpReceiver
from tests.conftest import SECOND_MODEL, SecondApp

pytestmark = pytest.mark.stack

SYSTEM = (
    "Du er en hjælpsom assistent for en dansk kommune. Svar kort og præcist, og henvis til de relevante regler, "
    "når borgeren spørger om affald, parkering, byggetilladelser eller åbningstider. "
) * 6


@dataclass(frozen=True)
class Turn:
    trace_id: str
    reply: str
    prompt_tokens: int
    cached_tokens: int


def ask(app: SecondApp, messages: list[dict[str, str]]) -> Turn:
    trace_id = secrets.token_hex(16)
    r = httpx.post(
        f"{app.base_url}/v1/chat/completions",
        json={"model": SECOND_MODEL, "messages": messages, "max_tokens": 8, "temperature": 0},
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
            if span.name == "POST /v1/chat/completions" and "anker.engine_replica" in span.attributes:
                return str(span.attributes["anker.engine_replica"])
        time.sleep(0.5)
    raise AssertionError(f"no span of an engine replica for trace {trace_id}")


def test_a_multi_turn_conversation_keeps_landing_on_the_replica_that_holds_its_prefix(
    second_app: SecondApp, otlp: OtlpReceiver
) -> None:
    conversations: list[list[Turn]] = []
    for number in range(4):
        messages = [{"role": "system", "content": f"Samtale {number}. {SYSTEM}"}]
        turns = []
        for question in ("Hvornår tømmes skraldespanden?", "Og papircontaineren?", "Hvad med storskrald?"):
            messages.append({"role": "user", "content": question})
            turn = ask(second_app, messages)
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
