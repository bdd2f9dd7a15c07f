"""The HTTP layer in-process: real ASGI app, real tokenizer logic, and an engine double (generation is not measured).

Checks OpenAI's shapes for responses, streams and errors, auth, body limits, 503 for a starting engine and a
clean end to a stream whose engine fails; the real engine path is covered by the stack tests.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from deployments.contracts import EngineFailure
from deployments.tokenizer import TokenizerCore, TokenizerSpec
from testkit.doubles import InstantEngineDouble
from testkit.sse import parse_events
from tests.inprocess import CTX, inprocess_stack

AUTH: dict[str, str] = {}


@pytest.fixture(scope="module")
def tokenizer_core(tiny_models: dict[str, Path]) -> TokenizerCore:
    return TokenizerCore([TokenizerSpec(n, p, CTX) for n, p in tiny_models.items()], block_size=16)


@asynccontextmanager
async def make_client(
    core: TokenizerCore, engines: dict[str, InstantEngineDouble], data_dir: Path
) -> AsyncIterator[httpx.AsyncClient]:
    async with inprocess_stack(core, data_dir, engines) as stack:
        AUTH["Authorization"] = f"Bearer {stack.key('t')}"
        yield stack.client


@pytest.fixture
async def client(tokenizer_core: TokenizerCore, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    engines = {"qwen3-next-tiny": InstantEngineDouble(), "qwen3-moe-tiny": InstantEngineDouble()}
    async with make_client(tokenizer_core, engines, tmp_path) as c:
        yield c


def chat_body(**extra: object) -> dict[str, object]:
    return {"model": "qwen3-next-tiny", "messages": [{"role": "user", "content": "hej"}], **extra}


def assert_openai_error(response: httpx.Response, status: int, code: str | None) -> dict[str, object]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["message"]
    return error


async def test_chat_completion_shape_and_usage(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json=chat_body(max_tokens=3, n=2), headers=AUTH)
    assert r.status_code == 200 and r.headers["x-request-id"].startswith("chatcmpl-")
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "qwen3-next-tiny"
    assert [c["message"]["content"] for c in body["choices"]] == ["t0t1t2", "t0t1t2"]
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "length"]
    usage = body["usage"]
    assert usage["completion_tokens"] == 6 and usage["total_tokens"] == usage["prompt_tokens"] + 6
    assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] // 2


async def test_chat_stream_framing_roles_and_usage_chunk(client: httpx.AsyncClient) -> None:
    body = chat_body(max_tokens=2, stream=True, stream_options={"include_usage": True})
    r = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = parse_events(r.content)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and "usage" in c for c in chunks)
    assert [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]] == ["t0", "t1"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2
    assert all(c["usage"] is None for c in chunks[:-1])


async def test_stream_without_include_usage_has_no_usage_field(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json=chat_body(max_tokens=1, stream=True), headers=AUTH)
    chunks = parse_events(r.content)[:-1]
    assert all("usage" not in c for c in chunks)


async def test_completions_batch_indices_and_logprobs(client: httpx.AsyncClient) -> None:
    body = {"model": "qwen3-moe-tiny", "prompt": ["a", "b"], "n": 2, "max_tokens": 2, "logprobs": 2}
    r = await client.post("/v1/completions", json=body, headers=AUTH)
    data = r.json()
    assert data["object"] == "text_completion" and [c["index"] for c in data["choices"]] == [0, 1, 2, 3]
    lp = data["choices"][0]["logprobs"]
    assert lp["tokens"] == ["t0", "t1"] and lp["text_offset"] == [0, 2] and len(lp["top_logprobs"][0]) == 2


async def test_chat_logprobs_shape(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions", json=chat_body(max_tokens=1, logprobs=True, top_logprobs=2), headers=AUTH
    )
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert content[0]["token"] == "t0" and content[0]["bytes"] == list(b"t0") and len(content[0]["top_logprobs"]) == 2


async def test_models_routes(client: httpx.AsyncClient) -> None:
    listed = (await client.get("/v1/models", headers=AUTH)).json()
    assert [m["id"] for m in listed["data"]] == ["qwen3-next-tiny", "qwen3-moe-tiny"]
    assert (await client.get("/v1/models/qwen3-moe-tiny", headers=AUTH)).json()["object"] == "model"
    assert_openai_error(await client.get("/v1/models/gpt-4o", headers=AUTH), 404, "model_not_found")


async def test_auth_is_required_on_every_v1_route(client: httpx.AsyncClient) -> None:
    for method, path in [
        ("GET", "/v1/models"),
        ("GET", "/v1/models/x"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
    ]:
        assert_openai_error(await client.request(method, path), 401, "invalid_api_key")
        bad = {"Authorization": "Bearer ank_wrong"}
        assert_openai_error(await client.request(method, path, headers=bad), 401, "invalid_api_key")


async def test_auth_comes_before_body_validation(client: httpx.AsyncClient) -> None:
    assert_openai_error(await client.post("/v1/chat/completions", content=b"{bad"), 401, "invalid_api_key")


async def test_client_errors_are_4xx_in_openai_shape(client: httpx.AsyncClient) -> None:
    post = client.post
    assert_openai_error(await post("/v1/chat/completions", content=b"{bad", headers=AUTH), 400, "invalid_json")
    assert_openai_error(
        await post("/v1/chat/completions", json=chat_body(model="nope"), headers=AUTH), 404, "model_not_found"
    )
    assert_openai_error(
        await post("/v1/chat/completions", json=chat_body(max_tokens=CTX), headers=AUTH), 400, "context_length_exceeded"
    )
    assert_openai_error(
        await post("/v1/chat/completions", json=chat_body(tools=[]), headers=AUTH), 400, "unsupported_parameter"
    )
    big = json.dumps(chat_body(messages=[{"role": "user", "content": "x" * 70_000}])).encode()
    assert_openai_error(await post("/v1/chat/completions", content=big, headers=AUTH), 413, "request_too_large")
    assert_openai_error(await client.get("/v1/nothing", headers=AUTH), 404, "unknown_url")
    assert_openai_error(await client.delete("/v1/models", headers=AUTH), 405, "method_not_allowed")


async def test_engine_not_ready_is_503_with_retry_after(tokenizer_core: TokenizerCore, tmp_path: Path) -> None:
    engines = {"qwen3-next-tiny": InstantEngineDouble(ready=False)}
    async with make_client(tokenizer_core, engines, tmp_path) as c:
        r = await c.post("/v1/chat/completions", json=chat_body(), headers=AUTH)
        assert_openai_error(r, 503, "engine_unavailable")
        assert int(r.headers["retry-after"]) > 0
        health = await c.get("/healthz")
        assert health.status_code == 503 and health.json()["models"]["qwen3-next-tiny"]["ready"] is False


async def test_engine_failure_before_first_token_is_503(tokenizer_core: TokenizerCore, tmp_path: Path) -> None:
    engines = {"qwen3-next-tiny": InstantEngineDouble(fail_after=0)}
    async with make_client(tokenizer_core, engines, tmp_path) as c:
        r = await c.post("/v1/chat/completions", json=chat_body(stream=True), headers=AUTH)
        assert_openai_error(r, 503, "engine_unavailable")


async def test_a_full_engine_queue_is_503_engine_overloaded_with_retry_after(
    tokenizer_core: TokenizerCore, tmp_path: Path
) -> None:
    overloaded = EngineFailure("The model is at capacity.", retry_after_s=2, overloaded=True)
    engines = {"qwen3-next-tiny": InstantEngineDouble(fail_after=0, failure=overloaded)}
    async with make_client(tokenizer_core, engines, tmp_path) as c:
        for stream in (False, True):
            r = await c.post("/v1/chat/completions", json=chat_body(stream=stream), headers=AUTH)
            assert_openai_error(r, 503, "engine_overloaded")
            assert r.headers["retry-after"] == "2"


async def test_engine_failure_mid_stream_ends_the_stream_cleanly(tokenizer_core: TokenizerCore, tmp_path: Path) -> None:
    engines = {"qwen3-next-tiny": InstantEngineDouble(fail_after=2)}
    async with make_client(tokenizer_core, engines, tmp_path) as c:
        r = await c.post("/v1/chat/completions", json=chat_body(stream=True, max_tokens=5), headers=AUTH)
        events = parse_events(r.content)
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "engine_unavailable"
        body = chat_body(stream=True, max_tokens=5, stream_options={"include_usage": True})
        events = parse_events((await c.post("/v1/chat/completions", json=body, headers=AUTH)).content)
        # The client is told what the cut-off stream is billed for: the 2 tokens it got.
        assert events[-3]["usage"]["completion_tokens"] == 2 and events[-2]["error"]["code"] == "engine_unavailable"
