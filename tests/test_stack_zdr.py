"""Zero data retention, proven on the real stack: requests carrying a canary that exists nowhere else (successes,
streams, client errors, an engine failure mid-stream, a stream the client cancels) go through both stacks, then
every place that could keep it is searched: every file under both data folders and both Ray session folders
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
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from testkit.otlp import OtlpReceiver
from tests.conftest import SECOND_MODEL, EngineKill, SecondApp, Stack
from tests.traffic import CLIENT_TIMEOUT_S, Outcome, during, ledger_totals, stream_chat, wait_until

pytestmark = pytest.mark.stack

MAX_FILE_BYTES = 512 * 1024 * 1024
STREAMS = 6
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


def tool(canary: str) -> dict[str, object]:
    """A strict function tool whose description carries the canary (its arguments are numbers: see
    tests/test_server_inprocess.py's ALARM)."""
    return {
        "type": "function",
        "function": {
            "name": "set_alarm",
            "description": f"Sætter vækkeuret {canary}",
            "strict": True,
            "parameters": {
                "type": "object",
                "properties": {"hour": {"type": "integer", "enum": [6, 7, 8]}},
                "required": ["hour"],
                "additionalProperties": False,
            },
        },
    }


TOOL_CALL = {"name": "set_alarm", "arguments": '{"hour": 7}'}


@dataclass(frozen=True)
class Sent:
    """What ``send_everything`` sent: the ids of the requests the server took, how many each key's ledger must
    show, and the streams that ran while an engine replica was killed."""

    ids: list[str]
    billed_requests: list[tuple[str, str, int, int]]  # (base URL, key, least and most requests it is billed for)
    streams: list[Outcome]
    kill: EngineKill


async def send_everything(stack: Stack, app: SecondApp, canary: str) -> Sent:
    """Every kind of request, each carrying ``canary``, on keys of their own (so that their ledgers are theirs)."""
    ids: list[str] = []
    key, app_key = stack.new_key("zdr"), app.new_key("zdr")
    headers = {"Authorization": f"Bearer {key}"}
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
        # The agents' paths: a forced tool call with a tool turn in the history, structured output, the Responses
        # API plain and streamed; the canary in every part of the request they read.
        history = [
            *chat["messages"],
            {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": TOOL_CALL}]},
            {"role": "tool", "tool_call_id": "call_1", "content": f"Svar {canary}"},
        ]
        thinking_off = {"chat_template_kwargs": {"enable_thinking": False}}
        for route, body in (
            (
                "/v1/chat/completions",
                {
                    **chat,
                    **thinking_off,
                    "messages": history,
                    "tools": [tool(canary)],
                    "tool_choice": "required",
                    "max_tokens": 40,
                },
            ),
            ("/v1/chat/completions", {**chat, **thinking_off, "response_format": {"type": "json_object"}}),
            (
                "/v1/responses",
                {"model": chat["model"], "instructions": canary, "input": f"Hej {canary}", "max_output_tokens": 3},
            ),
            (
                "/v1/responses",
                {"model": chat["model"], "input": f"Hej {canary}", "max_output_tokens": 3, "stream": True},
            ),
        ):
            served = await http.post(route, json=body)
            assert served.status_code == 200, served.text[:300]
            if "instructions" not in body:  # a response repeats its own instructions to its client, as OpenAI's do
                assert canary not in served.text, served.text[:300]
            ids.append(served.headers["x-request-id"])
        for bad in (
            {**chat, "max_tokens": canary},
            {**chat, f"{canary} tak": 1},  # a parameter's name is named back; a key shaped like text is not
            {**chat, "model": canary},
            {**chat, "messages": [{"role": canary, "content": canary}]},
            {"model": "qwen3-moe-tiny", "prompt": canary, "max_tokens": -1},
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

    # An engine failure mid-stream: streams of the canary on the second stack, one of whose engines is killed in the
    # middle of generating them. The kill's watch (it kills the first replica whose vLLM is generating) has found the
    # replicas before the streams start: finding them takes seconds, and on a fast moment of this machine the streams
    # all ended within those seconds when the watch began after their first chunk (every replica then ran nothing).
    looking = threading.Event()
    watching = asyncio.create_task(asyncio.to_thread(app.kill_engine_mid_generation, SECOND_MODEL, 2, looking=looking))
    assert await asyncio.to_thread(looking.wait, 120), "the kill's watch found no replica"
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S) as client:
        running = asyncio.gather(
            *(stream_chat(client, app.base_url, app_key, SECOND_MODEL, f"{i}. {canary}", 800) for i in range(STREAMS))
        )
        kill = await watching
        streams = await running
    # The eight requests that reached an engine on the stack, and the streams on the second stack that ended; and
    # those its replica's death cut: each one it had begun to deliver is billed from its progress in the replica's
    # spool (issue 15, hole 9), surely if its client got a chunk, maybe if the chunk was on its way.
    ended = sum(1 for o in streams if o.done)
    delivering = sum(1 for o in streams if not o.done and o.content_chunks)
    begun = sum(1 for o in streams if not o.done and o.status == 200)
    billed = [(stack.base_url, key, 8, 8), (app.base_url, app_key, ended + delivering, ended + begun)]
    return Sent(ids, billed, list(streams), kill)


def test_no_trace_of_request_content_anywhere(stack: Stack, second_app: SecondApp, otlp: OtlpReceiver) -> None:
    canary = f"zdr{secrets.token_hex(12)}"
    started = time.time()
    sent = asyncio.run(send_everything(stack, second_app, canary))
    cut = [o for o in sent.streams if o.status == 200 and not o.done]  # their replica's process died with them
    assert cut, f"the kill cut no stream of the canary ({sent.kill}): {during(sent.streams, 0.0, sent.kill.killed_s)}"
    needle = canary.encode()

    def searched() -> list[Path]:
        return [
            *files_under(stack.data_dir),
            *files_under(second_app.data_dir),
            *files_under(session_dir(stack)),
            *files_under(session_dir(second_app)),
            *files_under(Path(tempfile.gettempdir()), since=started),
            *files_under(Path("/dev/shm"), since=started),
        ]

    def left_behind() -> list[str]:
        """What these requests have not yet left where it goes at their end: a log line and spans with their ids,
        their usage in the ledgers."""
        files, spans = searched(), repr(list(otlp.spans))
        missing = [f"log line of {i}" for i in sent.ids if not containing(files, i.encode())]
        missing += [f"span of {i}" for i in sent.ids if i not in spans]
        for base_url, key, least, most in sent.billed_requests:
            billed = ledger_totals(base_url, key)["requests"]
            if not least <= billed <= most:
                missing.append(f"usage: {billed} requests billed, not {least}..{most}")
        return missing

    # The search covers what these requests left behind: once their ids (metadata, which may be kept) are in the
    # logs and the spans and their usage is in the ledgers, the canary is looked for in all of it.
    asyncio.run(wait_until(lambda: not left_behind(), 120, lambda: str(left_behind()), period_s=2))

    files = searched()
    assert len(files) > 100, f"only {len(files)} files searched"
    assert containing(files, needle) == []

    assert otlp.payloads, "no spans were exported"
    assert needle not in b"".join(otlp.payloads)  # the raw exports: names, attributes, events, statuses

    for each in (stack, second_app):
        scrape = httpx.get(f"http://127.0.0.1:{each.env['ANKER__RAY__METRICS_EXPORT_PORT']}/metrics", timeout=30).text
        assert "ray_anker_requests_total" in scrape and canary not in scrape

    ledgers = ledger_dump(f"sqlite:///{stack.data_dir / 'anker.db'}") + ledger_dump(second_app.ledger.url)
    assert canary not in ledgers
