"""`anker drain` on the real stack: what a KubeRay pod's stop hook runs (cluster/kuberay.py), and what an operator
runs before maintenance.

Streams running when the drain begins finish; new requests meanwhile get 503 `server_shutting_down` with
Retry-After and `/healthz` says "draining"; the command returns once nothing runs, and the API stays drained after
it (the pod stops next) until `anker drain --undo`. A worker's hook (`--follow`) joins a drain that began and returns
at once when none did.
"""

from __future__ import annotations

import asyncio
import subprocess
import time

import httpx
import pytest

from tests.conftest import Stack
from tests.traffic import Outcome, ledger_totals, stream_chat, wait_for_ledger

pytestmark = pytest.mark.stack

MODEL = "qwen3-moe-tiny"
STREAMS = 4


def health(base_url: str) -> tuple[int, str]:
    r = httpx.get(f"{base_url}/healthz", timeout=10)
    return r.status_code, str(r.json().get("status", ""))


def test_a_drain_lets_the_running_stream_finish_and_holds_until_undone(stack: Stack) -> None:
    key = stack.new_key("drain-command")
    before = ledger_totals(stack.base_url, key)

    async def scenario() -> tuple[
        list[Outcome], subprocess.CompletedProcess[str], set[tuple[int, str]], Outcome | None
    ]:
        async with httpx.AsyncClient(timeout=120) as client:
            # Several long streams: a random-weight model may end one early (its end-of-text token), never all.
            running = [
                asyncio.create_task(stream_chat(client, stack.base_url, key, MODEL, f"{i}. Fortæl en historie", 600))
                for i in range(STREAMS)
            ]
            await asyncio.sleep(2)  # the streams are running
            assert not all(t.done() for t in running), "every stream ended before the drain began: nothing to wait for"
            drain = asyncio.create_task(asyncio.to_thread(stack.anker, "drain", timeout=180))
            said: set[tuple[int, str]] = set()
            refused: Outcome | None = None
            while not drain.done():
                said.add(await asyncio.to_thread(health, stack.base_url))
                if refused is None and (503, "draining") in said:
                    refused = await stream_chat(client, stack.base_url, key, MODEL, "Hej", 4)
                await asyncio.sleep(0.2)
            assert all(t.done() for t in running), "the drain ended while a stream was still running"
            return [await t for t in running], await drain, said, refused

    try:
        streams, drained, said, refused = asyncio.run(scenario())
        assert drained.returncode == 0, drained.stdout + drained.stderr
        assert "drained in" in drained.stdout, drained.stdout
        assert (503, "draining") in said, said
        assert refused is not None, "no request was made while draining"
        assert (refused.status, refused.error_code) == (503, "server_shutting_down"), refused
        assert refused.retry_after
        assert all(o.status == 200 and o.clean and o.error_code is None for o in streams), streams

        # The drain holds after the command returned (the pod stops next); a worker's hook joins it.
        assert health(stack.base_url) == (503, "draining")
        follower = stack.anker("drain", "--follow", "5", timeout=180)
        assert follower.returncode == 0 and "drained in" in follower.stdout, follower.stdout + follower.stderr
    finally:
        undone = stack.anker("drain", "--undo")
    assert undone.returncode == 0, undone.stderr
    deadline = time.monotonic() + 30
    while health(stack.base_url) != (200, "ok") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert health(stack.base_url) == (200, "ok")

    # No drain under way: a worker's hook waits its follow window and lets the pod go.
    alone = stack.anker("drain", "--follow", "1")
    assert alone.returncode == 0 and "no drain began" in alone.stdout, alone.stdout + alone.stderr
    assert health(stack.base_url) == (200, "ok")

    # The finished streams are billed as their clients were told; the refused request costs nothing.
    billed, expected = wait_for_ledger(stack.base_url, key, before, [*streams, refused])
    assert billed == expected
