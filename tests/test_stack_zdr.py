"""Zero data retention, proven on the real stack: requests carrying a canary that exists nowhere else (successes,
streams, client errors, an engine failure mid-stream, a stream the client cancels) go through both applications,
then every place that could keep it is searched: every file under both data folders and the Ray session folder
(logs, spilled objects, runtime resources), every file written under the temp folders since the test began, every
span the stack exported, the metrics scrape, and every row of both ledgers (SQLite and PostgreSQL). Zero hits; and
the same search finds the requests' ids (metadata, which may be kept), so it did look where those requests left
traces.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import SECOND_MODEL, SecondApp, Stack
from tests.otlp import OtlpReceiver
from tests.traffic import CLIENT_TIMEOUT_S, stream_chat

pytestmark = pytest.mark.stack

MAX_FILE_BYTES = 512 * 1024 * 1024
SKIPPED_SUFFIXES = {".safetensors"}  # the model's weights, written before any request


def files_under(root: Path, since: float | None = None) -> list[Path]:
    found = []
    for path in root.rglob("*"):
        try:
            if not path.is_file() or path.is_symlink() or path.suffix in SKIPPED_SUFFIXES:
                continue
            stat = path.stat()
        except OSError:
            continue
        if stat.st_size <= MAX_FILE_BYTES and (since is None or stat.st_mtime >= since):
            found.append(path)
    return found


def containing(paths: list[Path], needle: bytes) -> list[str]:
    hits = []
    for path in paths:
        try:
            if needle in path.read_bytes():
                hits.append(str(path))
        except OSError:
            continue
    return hits


def ledger_dump(url: str) -> str:
    """Every row of every table of a ledger, as text."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            tables = sa.inspect(connection).get_table_names()
            return "\n".join(
                repr(row) for table in tables for row in connection.execute(sa.text(f'SELECT * FROM "{table}"'))
            )
    finally:
        engine.dispose()


def session_dir(stack: Stack) -> Path:
    state = json.loads((stack.data_dir / "run" / "state.json").read_text())
    return Path(state["ray_session_dir"])


async def send_everything(stack: Stack, app: SecondApp, canary: str) -> list[str]:
    """Every kind of request, each carrying ``canary``; returns the ids of the requests the server took."""
    ids: list[str] = []
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    chat = {"model": "qwen3-moe-tiny", "messages": [{"role": "user", "content": f"Hej {canary}"}], "max_tokens": 3}
    async with httpx.AsyncClient(base_url=stack.base_url, headers=headers, timeout=CLIENT_TIMEOUT_S) as http:
        ok = await http.post("/v1/chat/completions", json=chat)
        assert ok.status_code == 200
        ids.append(ok.headers["x-request-id"])
        streamed = await http.post("/v1/chat/completions", json={**chat, "stream": True})
        assert streamed.status_code == 200 and canary not in streamed.text
        ids.append(streamed.headers["x-request-id"])
        completion = await http.post(
            "/v1/completions", json={"model": "qwen3-next-tiny", "prompt": f"Hej {canary}", "max_tokens": 3}
        )
        assert completion.status_code == 200
        ids.append(completion.headers["x-request-id"])
        for bad in (
            {**chat, "max_tokens": canary},
            {**chat, canary: 1},
            {**chat, "model": canary},
            {**chat, "messages": [{"role": canary, "content": canary}]},
            {"model": "qwen3-moe-tiny", "prompt": canary, "echo": True},
            {**chat, "messages": [{"role": "user", "content": canary * 20_000}]},  # past the context
        ):
            route = "/v1/completions" if "prompt" in bad else "/v1/chat/completions"
            refused = await http.post(route, json=bad)
            assert 400 <= refused.status_code < 500 and canary not in refused.text, refused.text[:300]
        # A stream the client walks away from after its first chunk.
        async with http.stream(
            "POST", "/v1/chat/completions", json={**chat, "max_tokens": 200, "stream": True}
        ) as cancelled:
            ids.append(cancelled.headers["x-request-id"])
            async for _ in cancelled.aiter_bytes():
                break

    # An engine failure mid-stream: streams of the canary on the second app while one of its engines is killed.
    async def streams() -> None:
        async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S) as client:
            await asyncio.gather(
                *(stream_chat(client, app.base_url, app.api_key, SECOND_MODEL, f"{i}. {canary}", 200) for i in range(6))
            )

    running = asyncio.create_task(streams())
    await asyncio.sleep(3)
    await asyncio.to_thread(app.kill_replica, f"Engine-{SECOND_MODEL}", 2)
    await running
    return ids


def test_no_trace_of_request_content_anywhere(stack: Stack, second_app: SecondApp, otlp: OtlpReceiver) -> None:
    canary = f"zdr{secrets.token_hex(12)}"
    started = time.time()
    ids = asyncio.run(send_everything(stack, second_app, canary))
    time.sleep(12)  # logs flushed, spans exported, metrics pushed, usage delivered
    needle = canary.encode()

    files = [
        *files_under(stack.data_dir),
        *files_under(second_app.data_dir),
        *files_under(session_dir(stack)),
        *files_under(Path(tempfile.gettempdir()), since=started),
        *files_under(Path("/dev/shm"), since=started),
    ]
    assert len(files) > 100, f"only {len(files)} files searched"
    assert containing(files, needle) == []

    spans = repr(list(otlp.spans))
    assert otlp.payloads, "no spans were exported"
    assert needle not in b"".join(otlp.payloads)  # the raw exports: names, attributes, events, statuses

    scrape = httpx.get(f"http://127.0.0.1:{stack.env['ANKER__RAY__METRICS_EXPORT_PORT']}/metrics", timeout=30).text
    assert "ray_anker_requests_total" in scrape and canary not in scrape

    ledgers = ledger_dump(f"sqlite:///{stack.data_dir / 'anker.db'}") + ledger_dump(second_app.postgres.url)
    assert canary not in ledgers

    # The search did cover what these requests left behind: their ids (metadata) are in the logs and the spans.
    for request_id in ids:
        assert containing(files, request_id.encode()), f"request {request_id} left no log line"
        assert request_id in spans
