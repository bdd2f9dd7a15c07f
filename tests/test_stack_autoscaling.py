"""Queue-depth autoscaling on the real stack: a burst of streaming requests takes the autoscaled model's engine
deployment from 1 to 2 replicas, and back to 1 once the load is gone, while no request fails during either change.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from deployments.builder import APP_NAME
from tests.conftest import AUTOSCALED_MODEL, Stack

pytestmark = pytest.mark.stack

DEPLOYMENT = f"Engine-{AUTOSCALED_MODEL}"
BURST = 12  # in flight at once: a queue of 12 against a target of 4 per replica asks for the ceiling, 2


@pytest.fixture(scope="module")
def serve_status(stack: Stack) -> Iterator[object]:
    import ray
    from ray import serve

    from cluster.config import load_config
    from cluster.local import connect

    connect(load_config(None, dict(stack.env)))

    def running_replicas() -> int:
        deployment = serve.status().applications[APP_NAME].deployments[DEPLOYMENT]
        return int(deployment.replica_states.get("RUNNING", 0))

    yield running_replicas
    ray.shutdown()


async def stream_one(client: httpx.AsyncClient, key: str, max_tokens: int) -> str:
    """One streaming chat request; returns "ok", "ok after a retry", or what went wrong.

    Like the official SDK, a connection error before any response arrived is retried once (the server never
    started the answer, so nothing was produced or billed); anything after the response started is a failure.
    """
    body = {
        "model": AUTOSCALED_MODEL,
        "messages": [{"role": "user", "content": "Fortæl en lang historie om havnen i Esbjerg."}],
        "max_tokens": max_tokens,
        "stream": True,
    }
    for attempt in range(2):
        started = False
        try:
            async with client.stream(
                "POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
            ) as r:
                started = True
                if r.status_code != 200:
                    return f"http {r.status_code}"
                lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
        except httpx.TransportError as exc:
            if started or attempt == 1:
                return f"{type(exc).__name__} {'mid-stream' if started else 'before the response'}"
            continue
        if lines[-1] != "data: [DONE]":
            return "no [DONE]"
        if any('"error"' in line for line in lines):
            return "error event"
        return "ok" if attempt == 0 else "ok after a retry"
    return "unreachable"


async def load(
    client: httpx.AsyncClient, key: str, in_flight: int, max_tokens: int, stop: asyncio.Event
) -> Counter[str]:
    outcomes: Counter[str] = Counter()

    async def worker() -> None:
        while not stop.is_set():
            outcomes[await stream_one(client, key, max_tokens)] += 1

    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return outcomes


async def wait_for(condition: object, timeout_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if await asyncio.to_thread(condition):  # type: ignore[arg-type]
            return time.monotonic() - started
        await asyncio.sleep(1.0)
    raise AssertionError(f"not reached within {timeout_s:.0f}s")


async def test_a_burst_scales_the_engine_out_and_back_in_without_failing_a_request(
    stack: Stack, serve_status: object
) -> None:
    running = serve_status
    assert running() == 1  # type: ignore[operator]  # the floor, before any load
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=300) as client:
        stop_burst = asyncio.Event()
        burst = asyncio.create_task(load(client, stack.api_key, BURST, 400, stop_burst))
        up_s = await wait_for(lambda: running() == 2, timeout_s=300)  # type: ignore[operator]
        stop_burst.set()
        burst_outcomes = await burst

        # A trickle keeps going while the deployment scales back in: one request at a time is far below target.
        stop_trickle = asyncio.Event()
        trickle = asyncio.create_task(load(client, stack.api_key, 1, 16, stop_trickle))
        down_s = await wait_for(lambda: running() == 1, timeout_s=300)  # type: ignore[operator]
        await asyncio.sleep(3)  # requests routed while the old replica drained have finished by now
        stop_trickle.set()
        trickle_outcomes = await trickle

    print(
        f"scaled out after {up_s:.0f}s of burst, back in {down_s:.0f}s after it; {burst_outcomes}, {trickle_outcomes}"
    )
    fine = {"ok", "ok after a retry"}
    assert set(burst_outcomes) <= fine and burst_outcomes["ok"] >= BURST, burst_outcomes
    assert set(trickle_outcomes) <= fine and trickle_outcomes["ok"] >= 1, trickle_outcomes
