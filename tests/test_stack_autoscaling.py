"""Queue-depth autoscaling on the real stack: a burst of streaming requests takes the autoscaled model's engine
deployment from 1 to 2 replicas, and back to 1 once the load is gone, while no request fails during either change.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterator

import httpx
import pytest

from testkit.sse import DONE, aiter_events
from tests.conftest import AUTOSCALED_MODEL, Stack, engine_of
from tests.traffic import wait_until

pytestmark = pytest.mark.stack

BURST = 12  # in flight at once: a queue of 12 against a target of 4 per replica asks for the ceiling, 2


@pytest.fixture(scope="module")
def replica_states(stack: Stack) -> Iterator[Callable[[], dict[str, int]]]:
    """The autoscaled engine deployment's replicas by state, as Serve reports them (RUNNING, STARTING, STOPPING)."""
    import ray

    stack.connect()
    yield lambda: stack.replica_states(engine_of(AUTOSCALED_MODEL))
    ray.shutdown()


async def stream_one(client: httpx.AsyncClient, key: str, max_tokens: int) -> str:
    """One streaming chat request; returns "ok" or what went wrong (a status, an error event, a missing [DONE], or
    a transport error and whether the response had started)."""
    body = {
        "model": AUTOSCALED_MODEL,
        "messages": [{"role": "user", "content": "Fortæl en lang historie om havnen i Esbjerg."}],
        "max_tokens": max_tokens,
        "stream": True,
    }
    started = False
    try:
        async with client.stream(
            "POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as r:
            started = True
            if r.status_code != 200:
                return f"http {r.status_code}"
            events = [event async for event in aiter_events(r)]
    except httpx.TransportError as exc:
        return f"{type(exc).__name__} {'mid-stream' if started else 'before the response'}: {exc!r}"
    if not events or events[-1] != DONE:
        return "no [DONE]"
    if any("error" in event for event in events[:-1]):
        return "error event"
    return "ok"


class Load:
    """``in_flight`` clients, each streaming one request after another until ``stop``; what each request ended
    as, and when the last clean one was sent."""

    def __init__(self, client: httpx.AsyncClient, key: str, in_flight: int, max_tokens: int) -> None:
        self.outcomes: Counter[str] = Counter()
        self.last_ok_sent_s = 0.0
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run(client, key, in_flight, max_tokens))

    async def _run(self, client: httpx.AsyncClient, key: str, in_flight: int, max_tokens: int) -> None:
        async def worker() -> None:
            while not self._stop.is_set():
                sent = time.monotonic()
                outcome = await stream_one(client, key, max_tokens)
                self.outcomes[outcome] += 1
                if outcome == "ok":
                    self.last_ok_sent_s = max(self.last_ok_sent_s, sent)

        await asyncio.gather(*(worker() for _ in range(in_flight)))

    async def stop(self) -> Counter[str]:
        self._stop.set()
        await self._task
        return self.outcomes


async def test_a_burst_scales_the_engine_out_and_back_in_without_failing_a_request(
    stack: Stack, replica_states: Callable[[], dict[str, int]]
) -> None:
    states = replica_states
    await wait_until(lambda: states() == {"RUNNING": 1}, 120, lambda: str(states()), 1.0)  # the floor, before any load
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=300) as client:
        burst = Load(client, stack.api_key, BURST, 400)
        up_s = await wait_until(lambda: states().get("RUNNING", 0) == 2, 300, lambda: str(states()), 1.0)
        burst_outcomes = await burst.stop()

        # A trickle keeps going while the deployment scales back in: one request at a time is far below target.
        trickle = Load(client, stack.api_key, 1, 16)
        # The stopped replica is gone (nothing STOPPING) ...
        down_s = await wait_until(lambda: states() == {"RUNNING": 1}, 300, lambda: str(states()), 1.0)
        # ... and the remaining replica serves: a request sent after that was answered.
        gone = time.monotonic()
        await wait_until(lambda: trickle.last_ok_sent_s >= gone, 60, lambda: str(trickle.outcomes), 1.0)
        trickle_outcomes = await trickle.stop()

    print(
        f"scaled out after {up_s:.0f}s of burst, back in {down_s:.0f}s after it; {burst_outcomes}, {trickle_outcomes}"
    )
    assert set(burst_outcomes) == {"ok"} and burst_outcomes["ok"] >= BURST, burst_outcomes
    assert set(trickle_outcomes) == {"ok"}, trickle_outcomes
