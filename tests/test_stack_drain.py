"""`anker drain` on the real stack: what a KubeRay pod's stop hook runs (cluster/kuberay.py), and what an operator
runs before maintenance.

Streams running when the drain begins finish; new requests meanwhile get 503 `server_shutting_down` with
Retry-After and `/healthz` says "draining"; the command returns once nothing runs, and the API stays drained after
it (the pod stops next) until `anker drain --undo`. A worker's hook (`--follow`) joins a drain that began and returns
at once when none did.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from collections.abc import Callable

import httpx
import pytest

from deployments.drain import LOOK_PERIOD_S
from tests.conftest import Stack
from tests.traffic import Outcome, StaggeredStreams, during, ledger_totals, stream_chat, wait_for_ledger

pytestmark = pytest.mark.stack

MODEL = "qwen3-moe-tiny"
# Greedy decoding on the tiny MoE model falls into a loop without its end-of-text token, so each stream runs its
# full length: seconds of generation, longer than the second between two streams' starts.
GREEDY = 0.0
MAX_TOKENS = 400
AT_ONCE = 4  # streams the drain waits for at most
# What `anker drain` says once every ingress replica drains: how many requests it found running then.
BEGAN = re.compile(r"(\d+) requests were running when it began")
Finished = subprocess.CompletedProcess[str]


def health(base_url: str) -> tuple[int, str]:
    r = httpx.get(f"{base_url}/healthz", timeout=10)
    return r.status_code, str(r.json().get("status", ""))


def timed(command: Callable[..., Finished], *args: str, **kwargs: float) -> tuple[Finished, float]:
    """What ``command`` returned, and when (time.monotonic())."""
    return command(*args, **kwargs), time.monotonic()


def test_a_drain_lets_the_running_streams_finish_and_holds_until_undone(stack: Stack) -> None:
    drain_lets_running_streams_finish_and_holds_until_undone(stack)


def drain_lets_running_streams_finish_and_holds_until_undone(stack: Stack) -> None:
    """The drain's whole course on ``stack`` (either edition: tests/test_direct_ingress.py runs it on the second)."""
    key = stack.new_key("drain-command")
    before = ledger_totals(stack.base_url, key)
    assert health(stack.base_url) == (200, "ok"), "the API is not serving before the drain (a drain left over?)"

    served_late: list[Outcome] = []  # taken by a replica that had not yet found the drain (see below)

    async def scenario() -> tuple[list[Outcome], Finished, float, set[tuple[int, str]], Outcome]:
        # Long streams start one a second until the drain has begun: the command takes seconds to start, and
        # whenever it takes hold, streams are running (which its report shows).
        load = StaggeredStreams(stack.base_url, key, MODEL, MAX_TOKENS, at_most=AT_ONCE, temperature=GREEDY)
        streams = asyncio.create_task(load.run())
        await load.wait_for(lambda: load.receiving > 0, 120, "a stream delivering before the drain")
        drain = asyncio.create_task(asyncio.to_thread(timed, stack.anker, "drain", timeout=300))
        said: set[tuple[int, str]] = set()
        refused: Outcome | None = None
        async with httpx.AsyncClient(timeout=120) as client:
            while not drain.done():
                said.add(await asyncio.to_thread(health, stack.base_url))
                if refused is None and (503, "draining") in said:
                    load.stop()  # the streams it let in run to their end
                    # Each ingress replica finds the drain within its watch's period (drain.LOOK_PERIOD_S):
                    # /healthz (the control application) can say so before the model's replica
                    # refuses. A request it still takes is served in full, and the drain waits for it.
                    deadline = time.monotonic() + 2 * LOOK_PERIOD_S + 1
                    while True:
                        outcome = await stream_chat(client, stack.base_url, key, MODEL, "Hej", 4)
                        if outcome.status != 200 or time.monotonic() > deadline:
                            refused = outcome
                            break
                        served_late.append(outcome)
                await asyncio.sleep(0.2)
        load.stop()
        assert refused is not None, f"no request was made while draining: /healthz said {said}"
        drained, drained_s = await drain
        return await streams, drained, drained_s, said, refused

    try:
        outcomes, drained, drained_s, said, refused = asyncio.run(scenario())
        assert drained.returncode == 0, drained.stdout + drained.stderr
        assert "drained in" in drained.stdout, drained.stdout
        assert (503, "draining") in said, said
        began = BEGAN.search(drained.stdout)
        assert began, drained.stdout
        streamed = [o for o in outcomes if o.status == 200]
        accounts = during(outcomes, 0.0, drained_s)
        assert int(began[1]) > 0, f"no stream was running when the drain began: {drained.stdout}; {accounts}"
        assert all(o.clean and o.error_code is None for o in streamed), accounts
        assert all(o.ended_s <= drained_s for o in streamed), f"the drain ended while a stream ran: {accounts}"
        assert (refused.status, refused.error_code) == (503, "server_shutting_down"), refused
        assert all(o.clean and o.error_code is None for o in served_late), served_late
        assert refused.retry_after
        # Streams started after it began were refused the same way.
        assert all((o.status, o.error_code) == (503, "server_shutting_down") for o in outcomes if o.status != 200)

        # The drain holds after the command returned (the pod stops next); a worker's hook joins it.
        assert health(stack.base_url) == (503, "draining")
        follower = stack.anker("drain", "--follow", "5", timeout=300)
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

    # The finished streams are billed as their clients were told; the refused requests cost nothing.
    billed, expected = wait_for_ledger(stack.base_url, key, before, [*outcomes, refused, *served_late])
    assert billed == expected
