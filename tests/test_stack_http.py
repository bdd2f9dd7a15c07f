"""Raw HTTP against the real stack: every client mistake is a 4xx in OpenAI's shape, never a 500, and request content
never reaches a log line of the stack.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from testkit.sse import parse_events
from tests.conftest import Stack

pytestmark = pytest.mark.stack

CANARY = "ZDR-CANARY-1b9e4c"


@pytest.fixture(scope="module")
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {stack.api_key}"}, timeout=60) as c:
        yield c


def chat(**extra: object) -> dict[str, object]:
    return {"model": "qwen3-moe-tiny", "messages": [{"role": "user", "content": f"hej {CANARY}"}], **extra}


def expect(response: httpx.Response, status: int, code: str | None, param: str | None = "?") -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    if param != "?":
        assert error["param"] == param
    assert CANARY not in response.text


def test_engines_starting_answer_503_with_retry_after(stack: Stack) -> None:
    # Recorded while `anker up` started: HAProxy listens well before the engines are ready, and from then on a client
    # gets 503 engine_unavailable with Retry-After in OpenAI's shape (from HAProxy itself while no application serves
    # the path, then from the control application) until its model serves; never a 404, a 500 or a hang.
    seen = stack.startup
    assert seen, "no start-up probes were recorded"
    assert not [p for p in seen if p.status in ("ReadTimeout", "WriteTimeout", "PoolTimeout")], seen
    answered = [p for p in seen if isinstance(p.status, int)]
    assert {p.status for p in answered} <= {503, 200}, answered
    unavailable = [p for p in answered if p.status == 503]
    assert unavailable, f"the engines were never seen starting: {seen}"
    assert all(p.code == "engine_unavailable" and p.retry_after and int(p.retry_after) > 0 for p in unavailable)
    first_ok = next((i for i, p in enumerate(answered) if p.status == 200), len(answered))
    assert all(p.status == 200 for p in answered[first_ok:]), "once ready, the stack must stay ready"


def test_healthz_is_open_and_ready(stack: Stack) -> None:
    r = httpx.get(f"{stack.base_url}/healthz", timeout=10)
    assert r.status_code == 200 and all(m["ready"] for m in r.json()["models"].values())


def test_auth_errors(stack: Stack) -> None:
    expect(httpx.get(f"{stack.base_url}/v1/models", timeout=10), 401, "invalid_api_key")
    bad = {"Authorization": "Bearer ank_000000000000_" + "A" * 43}
    expect(
        httpx.post(f"{stack.base_url}/v1/chat/completions", json=chat(), headers=bad, timeout=10),
        401,
        "invalid_api_key",
    )


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        (b"{not json", 400, "invalid_json", None),
        (b"\xff\xfe\xfd", 400, "invalid_json", None),
        (b"[" * 10_000, 400, "invalid_json", None),
        (json.dumps(chat(max_tokens=CANARY)).encode(), 400, "invalid_value", "max_tokens"),
        (json.dumps(chat(temperature="hot")).encode(), 400, "invalid_value", "temperature"),
        (json.dumps(chat(n=1000)).encode(), 400, "invalid_value", "n"),
        (json.dumps(chat(max_tokens=10**9)).encode(), 400, "invalid_value", "max_tokens"),
        (json.dumps(chat(logprobs=True, top_logprobs=99)).encode(), 400, "invalid_value", "top_logprobs"),
        (json.dumps(chat(stop=["a"] * 9)).encode(), 400, "invalid_value", "stop"),
        (json.dumps(chat(unknown_field=CANARY)).encode(), 400, "unsupported_parameter", "unknown_field"),
        # A key not shaped like a parameter's name may be text: it is not repeated.
        (json.dumps(chat(**{f"{CANARY} tak": 1})).encode(), 400, "unsupported_parameter", None),
        (json.dumps(chat(tools=[])).encode(), 400, "invalid_value", "tools"),
        (json.dumps(chat(store=True)).encode(), 400, "unsupported_value", "store"),
        (json.dumps(chat(model="no-such-model")).encode(), 404, "model_not_found", "model"),
        (
            json.dumps(chat(messages=[{"role": "user", "content": CANARY * 300_000}])).encode(),
            413,
            "request_too_large",
            None,
        ),
    ],
)
def test_client_mistakes_are_clear_4xx(
    http: httpx.Client, body: bytes, status: int, code: str | None, param: str | None
) -> None:
    expect(http.post("/v1/chat/completions", content=body), status, code, param)


def test_completion_mistakes(http: httpx.Client) -> None:
    base = {"model": "qwen3-next-tiny"}
    expect(http.post("/v1/completions", json={**base, "prompt": [10**7]}), 400, "invalid_value", "prompt")
    expect(http.post("/v1/completions", json={**base, "prompt": "x", "best_of": 3}), 400, "unsupported_parameter")
    expect(http.post("/v1/completions", json={**base, "prompt": [5] * 2100}), 400, "context_length_exceeded")
    expect(http.post("/v1/completions", json={**base}), 400, "invalid_value", "prompt")


def test_routes_and_methods(http: httpx.Client) -> None:
    expect(http.get("/v1/models/no-such-model"), 404, "model_not_found")
    expect(http.get("/v1/embeddings"), 404, "unknown_url")
    expect(http.put("/v1/chat/completions", json=chat()), 405, "method_not_allowed")


def test_stream_ends_with_done(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json=chat(max_tokens=3, stream=True))
    events = parse_events(r.content)
    assert events[-1] == "[DONE]" and events[0]["choices"][0]["delta"]["role"] == "assistant"


def test_no_request_content_in_any_stack_log(http: httpx.Client, stack: Stack) -> None:
    # A successful request, a streamed one and failing ones, all carrying the canary; then every log the stack
    # writes (the Ray session's logs, the data folder) is searched for it.
    ok = http.post("/v1/chat/completions", json=chat(max_tokens=2))
    assert ok.status_code == 200
    assert http.post("/v1/chat/completions", json=chat(max_tokens=2, stream=True)).status_code == 200
    assert http.post("/v1/chat/completions", json=chat(max_tokens=CANARY)).status_code == 400
    refused = {"model": "qwen3-moe-tiny", "prompt": CANARY, "max_tokens": -1}
    assert http.post("/v1/completions", json=refused).status_code == 400
    request_id = ok.headers["x-request-id"].encode()
    # The replica writes a request's usage line once the request has ended: look until it is there.
    deadline = time.monotonic() + 60
    while True:
        hits, id_seen_in = searched(stack, request_id)
        if id_seen_in or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert hits == [], f"request content found in: {hits}"
    # The search did cover the logs of these very requests: their id (metadata, allowed) is in them.
    assert id_seen_in, "the request's own log lines were not among the searched files"


def searched(stack: Stack, request_id: bytes) -> tuple[list[str], list[str]]:
    """The stack's files that hold the canary, and those that hold ``request_id``."""
    hits, id_seen_in = [], []
    for root in [stack.data_dir, *session_dirs(stack)]:
        for path in root.rglob("*"):
            if not path.is_file() or path.suffix == ".safetensors":
                continue
            try:
                data = path.read_bytes()
            except OSError:
                continue
            if CANARY.encode() in data:
                hits.append(str(path))
            if request_id in data:
                id_seen_in.append(str(path))
    return hits, id_seen_in


def session_dirs(stack: Stack) -> list[Path]:
    """The Ray session folder of this stack (all its processes' logs), as `anker up` recorded it."""
    state = json.loads((stack.data_dir / "run" / "state.json").read_text())
    session = Path(state["ray_session_dir"])
    assert (session / "logs").is_dir(), f"the stack's Ray session folder is missing: {session}"
    return [session]
