"""Bad input on the real HTTP path, in process: an engine replica's app and door over a real vLLM on the tiny
Qwen3-MoE with its real billing (bodies), and the control application (queries). Every client mistake gets a clear
4xx in OpenAI's error shape that names the field, and the input shows up nowhere — not in the error, not in the
response, not in any log record or on stdout/stderr.

Each bad request carries a canary; the test captures every log record at DEBUG from every logger while it runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from deployments.server.requests import MAX_STOP, MAX_STOP_CHARS
from tests.inprocess import REPLICA_MODEL, ServingLayer, inprocess_control, inprocess_replica, serving_layer

CANARY = "ZDR-CANARY-b4d-1nput"  # not shaped like a parameter name: no error may repeat it
MODEL = REPLICA_MODEL
CTX = 2048  # the engine's max_model_len
LIMIT = 64 * 1024  # the replica's max_body_bytes
CLIENT_LOGGER = "httpx"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def chat(**fields: Any) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": CANARY}], **fields}).encode()


def completion(**fields: Any) -> bytes:
    return json.dumps({"model": MODEL, "prompt": CANARY, **fields}).encode()


def nested(depth: int) -> bytes:
    return chat()[:-1] + b', "metadata": ' + b"[" * depth + json.dumps(CANARY).encode() + b"]" * depth + b"}"


def with_bytes(raw: bytes) -> bytes:
    """A chat request whose message holds ``raw`` (bytes or an escape that JSON parsing refuses) after the canary."""
    return chat(messages=[{"role": "user", "content": CANARY + "|"}]).replace(b"|", raw)


# (id, path, body, status, code, param): what a client sends by mistake, and the answer it must get.
BAD_BODIES: list[tuple[str, str, bytes, int, str | None, str | None]] = [
    # -- not a JSON object, or not one we can read --
    ("not-json", CHAT, b'{"model": "' + CANARY.encode(), 400, "invalid_json", None),
    ("invalid-utf8", CHAT, with_bytes(b"\xff\xfe\xc3"), 400, "invalid_json", None),
    ("latin1", CHAT, with_bytes("æøå".encode("latin-1")), 400, "invalid_json", None),
    ("lone-surrogate", CHAT, with_bytes(b"\\ud800"), 400, "invalid_json", None),
    ("control-character", CHAT, with_bytes(b"\x00\x07"), 400, "invalid_json", None),
    ("empty", CHAT, b"", 400, "invalid_json", None),
    ("array", CHAT, json.dumps([CANARY]).encode(), 400, "invalid_json", None),
    ("string", CHAT, json.dumps(CANARY).encode(), 400, "invalid_json", None),
    ("trailing", CHAT, chat() + CANARY.encode(), 400, "invalid_json", None),
    ("nested-deep", CHAT, nested(30_000), 400, "invalid_json", None),
    (
        "nested-in-any",
        CHAT,
        chat()[:-1] + b', "function_call": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        400,
        "invalid_json",
        None,
    ),
    ("huge-number", CHAT, chat()[:-1] + b', "max_tokens": 1' + b"0" * 5000 + b"}", 400, "invalid_json", None),
    # -- max_tokens --
    ("max-tokens-negative", CHAT, chat(max_tokens=-1), 400, "invalid_value", "max_tokens"),
    ("max-tokens-zero", CHAT, chat(max_tokens=0), 400, "invalid_value", "max_tokens"),
    ("max-tokens-huge", CHAT, chat(max_tokens=10**30), 400, "invalid_value", "max_tokens"),
    ("max-tokens-fraction", CHAT, chat(max_tokens=2.5), 400, "invalid_value", "max_tokens"),
    (
        "max-completion-tokens-negative",
        CHAT,
        chat(max_completion_tokens=-5),
        400,
        "invalid_value",
        "max_completion_tokens",
    ),
    ("completion-max-tokens-huge", COMPLETIONS, completion(max_tokens=10**9), 400, "invalid_value", "max_tokens"),
    # -- n --
    ("n-zero", CHAT, chat(n=0), 400, "invalid_value", "n"),
    ("n-negative", CHAT, chat(n=-3), 400, "invalid_value", "n"),
    ("n-above-limit", CHAT, chat(n=17), 400, "invalid_value", "n"),
    ("n-huge", CHAT, chat(n=10**12), 400, "invalid_value", "n"),
    ("n-bool", CHAT, chat(n=True), 400, "invalid_value", "n"),
    # -- logprobs --
    ("top-logprobs-above", CHAT, chat(logprobs=True, top_logprobs=21), 400, "invalid_value", "top_logprobs"),
    ("top-logprobs-negative", CHAT, chat(logprobs=True, top_logprobs=-1), 400, "invalid_value", "top_logprobs"),
    ("top-logprobs-alone", CHAT, chat(top_logprobs=2), 400, "invalid_value", "top_logprobs"),
    ("logprobs-not-bool", CHAT, chat(logprobs=CANARY), 400, "invalid_value", "logprobs"),
    ("completion-logprobs-negative", COMPLETIONS, completion(logprobs=-1), 400, "invalid_value", "logprobs"),
    # -- stop --
    ("stop-many", CHAT, chat(stop=[CANARY] * 1000), 400, "invalid_value", "stop"),
    ("stop-one-too-many", CHAT, chat(stop=[CANARY] * (MAX_STOP + 1)), 400, "invalid_value", "stop"),
    ("stop-long", CHAT, chat(stop=CANARY * (MAX_STOP_CHARS // len(CANARY) + 1)), 400, "invalid_value", "stop"),
    ("stop-long-in-list", CHAT, chat(stop=["a", CANARY * 1000]), 400, "invalid_value", "stop"),
    ("stop-empty", CHAT, chat(stop=[""]), 400, "invalid_value", "stop"),
    ("stop-wrong-type", CHAT, chat(stop=[CANARY, 5]), 400, "invalid_value", "stop"),
    # -- unknown and unsupported fields --
    # shaped like a parameter name: named back, as OpenAI does; any other key is not repeated
    ("unknown-field", CHAT, chat(frobnicate=CANARY), 400, "unsupported_parameter", "frobnicate"),
    ("unknown-field-text", CHAT, chat(**{CANARY: 1}), 400, "unsupported_parameter", None),
    (
        "image-part",
        CHAT,
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": CANARY}}]}]),
        400,
        "unsupported_value",  # the tiny model reads no images
        "messages",
    ),
    ("store", CHAT, chat(store=True), 400, "unsupported_value", "store"),
    ("suffix", COMPLETIONS, completion(suffix=CANARY), 400, "invalid_value", "suffix"),
    # -- wrong types and shapes --
    ("messages-string", CHAT, chat(messages=CANARY), 400, "invalid_value", "messages"),
    ("messages-empty", CHAT, chat(messages=[], user=CANARY), 400, "invalid_value", "messages"),
    (
        "content-number",
        CHAT,
        chat(messages=[{"role": "user", "content": 5}], user=CANARY),
        400,
        "invalid_value",
        "messages",
    ),
    ("role-unknown", CHAT, chat(messages=[{"role": CANARY, "content": "x"}]), 400, "invalid_value", "messages"),
    ("model-number", CHAT, chat(model=5), 400, "invalid_value", "model"),
    (
        "model-missing",
        CHAT,
        json.dumps({"messages": [{"role": "user", "content": CANARY}]}).encode(),
        400,
        "invalid_value",
        "model",
    ),
    ("temperature-string", CHAT, chat(temperature=CANARY), 400, "invalid_value", "temperature"),
    ("temperature-above", CHAT, chat(temperature=2.5), 400, "invalid_value", "temperature"),
    ("stream-string", CHAT, chat(stream=CANARY), 400, "invalid_value", "stream"),
    (
        "stream-options-alone",
        CHAT,
        chat(stream_options={"include_usage": True}),
        400,
        "invalid_value",
        "stream_options",
    ),
    ("user-too-long", CHAT, chat(user=CANARY * 20), 400, "invalid_value", "user"),
    ("metadata-value-type", CHAT, chat(metadata={CANARY: 5}), 400, "invalid_value", "metadata"),
    (
        "metadata-too-many",
        CHAT,
        chat(metadata={f"{CANARY}{i}": CANARY for i in range(17)}),
        400,
        "invalid_value",
        "metadata",
    ),
    ("prompt-object", COMPLETIONS, completion(prompt={"text": CANARY}), 400, "invalid_value", "prompt"),
    ("prompt-empty-list", COMPLETIONS, completion(prompt=[], user=CANARY), 400, "invalid_value", "prompt"),
    ("prompt-negative-token", COMPLETIONS, completion(prompt=[1, -7], user=CANARY), 400, "invalid_value", "prompt"),
    ("prompt-huge-token", COMPLETIONS, completion(prompt=[10**20], user=CANARY), 400, "invalid_value", "prompt"),
    ("prompt-too-many", COMPLETIONS, completion(prompt=[CANARY] * 65), 400, "invalid_value", "prompt"),
    # -- big, within the body limit: refused for what it says, without a crash --
    (
        "many-messages",
        CHAT,
        chat(messages=[{"role": "user", "content": CANARY}] * 1000),
        400,
        "context_length_exceeded",
        "messages",
    ),
    # -- bigger than the body limit --
    (
        "oversized",
        CHAT,
        chat(messages=[{"role": "user", "content": CANARY * (LIMIT // len(CANARY))}]),
        413,
        "request_too_large",
        None,
    ),
]
BAD_QUERIES: list[tuple[str, str, int, str | None, str | None]] = [
    ("usage-start-text", f"/v1/usage?start={CANARY}", 400, "invalid_value", "start"),
    ("usage-end-time-text", f"/v1/usage?end_time={CANARY}", 400, "invalid_value", "end_time"),
    ("usage-start-empty", "/v1/usage?start=", 400, "invalid_value", "start"),
    ("usage-start-out-of-range", "/v1/usage?start=99999999999999999999", 400, "invalid_value", "start"),
    ("usage-backwards", "/v1/usage?start=2026-11-02&end=2026-11-01", 400, "invalid_value", "end"),
    ("usage-group-by", f"/v1/usage?group_by={CANARY}", 400, "invalid_value", "group_by"),
    ("usage-unknown-parameter", f"/v1/usage?{CANARY}=1", 400, "invalid_value", None),
    ("usage-alias-invalid", f"/v1/usage?end=2026-12-01&end_time={CANARY}", 400, "invalid_value", "end_time"),
    ("usage-repeated-invalid", f"/v1/usage?start=2026-11-01&start={CANARY}", 400, "invalid_value", "start"),
]


@dataclass
class Api:
    client: httpx.AsyncClient
    auth: dict[str, str]


@pytest.fixture(scope="module")
async def serving(tiny_models: dict[str, Path], vllm_cpu_env: None) -> AsyncIterator[ServingLayer]:
    async with serving_layer(tiny_models[MODEL]) as layer:
        yield layer


@pytest.fixture(scope="module")
async def api(serving: ServingLayer, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Api]:
    """An engine replica of the model: where a call's body is read."""
    async with inprocess_replica(serving, tmp_path_factory.mktemp("bad-input")) as replica:
        yield Api(replica.client, {"Authorization": f"Bearer {replica.key('t')}"})


@pytest.fixture(scope="module")
async def control(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Api]:
    """The control application: where usage is asked for."""
    async with inprocess_control(tmp_path_factory.mktemp("bad-query"), (MODEL,)) as app:
        yield Api(app.client, {"Authorization": f"Bearer {app.key('t')}"})


class RecordCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def every_record(caplog: pytest.LogCaptureFixture) -> Iterator[list[logging.LogRecord]]:
    """Every log record at DEBUG of every logger while the test runs, those that do not propagate to the root
    included (caplog sets and restores the levels; one collector sees the records of all phases' loggers)."""
    names = list(logging.Logger.manager.loggerDict)
    caplog.set_level(logging.DEBUG)
    for name in names:
        caplog.set_level(logging.DEBUG, logger=name)
    collector = RecordCollector()
    loggers = [logging.getLogger(), *(logger for logger in map(logging.getLogger, names) if not logger.propagate)]
    for logger in loggers:
        logger.addHandler(collector)
    try:
        yield collector.records
    finally:
        for logger in loggers:
            logger.removeHandler(collector)


def assert_clean_refusal(
    response: httpx.Response,
    status: int,
    code: str | None,
    param: str | None,
    records: list[logging.LogRecord],
    captured: pytest.CaptureResult[str],
) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}
    error = body["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert (error["code"], error["param"]) == (code, param), error
    everything = [response.text, *(f"{k}: {v}" for k, v in response.headers.items())]
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    # The test's own HTTP client (httpx) logs the URL it requests; that is the client's side, not the server's.
    everything += [formatter.format(record) for record in records if not record.name.startswith(CLIENT_LOGGER)]
    everything += [captured.out, captured.err]
    assert not [text for text in everything if CANARY in text], "the input was repeated"


@pytest.mark.parametrize(
    ("path", "body", "status", "code", "param"), [c[1:] for c in BAD_BODIES], ids=[c[0] for c in BAD_BODIES]
)
async def test_bad_body_is_refused_cleanly(
    api: Api,
    every_record: list[logging.LogRecord],
    capsys: pytest.CaptureFixture[str],
    path: str,
    body: bytes,
    status: int,
    code: str | None,
    param: str | None,
) -> None:
    assert CANARY.encode() in body or not body
    response = await api.client.post(path, content=body, headers={**api.auth, "Content-Type": "application/json"})
    assert_clean_refusal(response, status, code, param, every_record, capsys.readouterr())


@pytest.mark.parametrize(
    ("url", "status", "code", "param"), [c[1:] for c in BAD_QUERIES], ids=[c[0] for c in BAD_QUERIES]
)
async def test_bad_query_is_refused_cleanly(
    control: Api,
    every_record: list[logging.LogRecord],
    capsys: pytest.CaptureFixture[str],
    url: str,
    status: int,
    code: str | None,
    param: str | None,
) -> None:
    response = await control.client.get(url, headers=control.auth)
    assert_clean_refusal(response, status, code, param, every_record, capsys.readouterr())


async def test_oversized_body_without_content_length_is_cut_off(
    api: Api, every_record: list[logging.LogRecord], capsys: pytest.CaptureFixture[str]
) -> None:
    """Streamed in chunks (no Content-Length to refuse up front): reading stops at the limit, with 413."""
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        yield chat()[:-3]
        for _ in range(64):  # 4 MiB in all, 64 times the limit
            sent += 1
            yield b"," + json.dumps(CANARY * 3000).encode()

    response = await api.client.post(CHAT, content=chunks(), headers=api.auth)
    assert "content-length" not in response.request.headers
    assert_clean_refusal(response, 413, "request_too_large", None, every_record, capsys.readouterr())
    assert sent < 64, "the server read the whole body"


# Edges that are valid: the refusals above must not reach them.
GOOD_EDGES: list[tuple[str, str, bytes]] = [
    ("integral-floats", CHAT, chat(n=2.0, max_tokens=2.0, seed=7.0, logprobs=True, top_logprobs=1.0)),
    ("token-ids-as-floats", COMPLETIONS, completion(prompt=[[1.0, 2], [3]], max_tokens=1)),
    ("stop-at-limits", CHAT, chat(max_tokens=1, stop=["s" * MAX_STOP_CHARS] * MAX_STOP)),
    ("metadata-at-limits", CHAT, chat(max_tokens=1, metadata={f"{i:064d}": "v" * 512 for i in range(16)})),
    (
        "empty-tool-fields",
        CHAT,
        chat(
            max_tokens=1,
            messages=[
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": "y", "tool_calls": []},
                {"role": "user", "content": "z"},
            ],
        ),
    ),
    ("null-optionals", CHAT, chat(max_tokens=1, stop=None, stream=None, store=None, stream_options=None)),
    ("store-false", CHAT, chat(max_tokens=1, store=False, response_format={"type": "text"})),
]


@pytest.mark.parametrize(("path", "body"), [c[1:] for c in GOOD_EDGES], ids=[c[0] for c in GOOD_EDGES])
async def test_valid_edge_is_accepted(api: Api, path: str, body: bytes) -> None:
    response = await api.client.post(path, content=body, headers=api.auth)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("query", ["start=1767225600.0", "start_time=1.7e9&end_time=1800000000", "start=2026-11-01"])
async def test_valid_usage_range_is_accepted(control: Api, query: str) -> None:
    response = await control.client.get(f"/v1/usage?{query}", headers=control.auth)
    assert response.status_code == 200, response.text


async def test_good_request_still_passes(
    api: Api, every_record: list[logging.LogRecord], capsys: pytest.CaptureFixture[str]
) -> None:
    """The refusals above are about the input, not a closed door: the same request, well formed, is answered, and
    what it logs (its usage line, which the capture sees) holds counts, not the canary in its message."""
    response = await api.client.post(CHAT, content=chat(max_tokens=2), headers=api.auth)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 2
    await asyncio.sleep(0)  # the usage line is written as the request ends
    logged = [record.getMessage() for record in every_record]
    assert any(line.startswith("usage request_id=") for line in logged), logged
    assert not [line for line in logged if CANARY in line] and CANARY not in capsys.readouterr().err
