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

from tests.conftest import AUTOSCALED_MODEL, Stack, engine_of
from tests.traffic import Outcome, ledger_totals, stream_chat, wait_for_ledger, wait_until

pytestmark = pytest.mark.stack

STORY = "Fortæl en lang historie om havnen i Esbjerg."
BURST = 12  # in flight at once: a queue of 12 against a target of 4 per replica asks for the ceiling, 2


@pytest.fixture(scope="module")
def replica_states(stack: Stack) -> Iterator[Callable[[], dict[str, int]]]:
    """The autoscaled engine deployment's replicas by state, as Serve reports them (RUNNING, STARTING, STOPPING)."""
    import ray

    stack.connect()
    yield lambda: stack.replica_states(engine_of(AUTOSCALED_MODEL))
    ray.shutdown()


class Load:
    """``in_flight`` clients, each streaming one request after another until ``stop``; what each request's client
    saw (``tests/traffic.py``), and when the last clean one was sent."""

    def __init__(self, client: httpx.AsyncClient, key: str, in_flight: int, max_tokens: int) -> None:
        self.outcomes: list[Outcome] = []
        self.last_ok_sent_s = 0.0
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run(client, key, in_flight, max_tokens))

    async def _run(self, client: httpx.AsyncClient, key: str, in_flight: int, max_tokens: int) -> None:
        async def worker() -> None:
            while not self._stop.is_set():
                outcome = await stream_chat(client, "", key, AUTOSCALED_MODEL, STORY, max_tokens)
                self.outcomes.append(outcome)
                if ok(outcome):
                    self.last_ok_sent_s = max(self.last_ok_sent_s, outcome.started_s)

        await asyncio.gather(*(worker() for _ in range(in_flight)))

    async def stop(self) -> list[Outcome]:
        self._stop.set()
        await self._task
        return self.outcomes


def ok(outcome: Outcome) -> bool:
    """A whole stream: no error (not even a clean refusal), [DONE] and its usage."""
    return outcome.status == 200 and outcome.done and outcome.error_code is None and outcome.usage is not None


async def test_a_burst_scales_the_engine_out_and_back_in_without_failing_a_request(
    stack: Stack, replica_states: Callable[[], dict[str, int]]
) -> None:
    states = replica_states
    key = stack.new_key("autoscaling-burst")  # a ledger of its own: what these clients were told is all it holds
    before = ledger_totals(stack.base_url, key)
    await wait_until(lambda: states() == {"RUNNING": 1}, 120, lambda: str(states()), 1.0)  # the floor, before any load
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=300) as client:
        burst = Load(client, key, BURST, 400)
        up_s = await wait_until(lambda: states().get("RUNNING", 0) == 2, 300, lambda: str(states()), 1.0)
        burst_outcomes = await burst.stop()

        # A trickle keeps going while the deployment scales back in: one request at a time is far below target.
        trickle = Load(client, key, 1, 16)
        # The stopped replica is gone (nothing STOPPING) ...
        down_s = await wait_until(lambda: states() == {"RUNNING": 1}, 300, lambda: str(states()), 1.0)
        # ... and the remaining replica serves: a request sent after that was answered.
        gone = time.monotonic()
        await wait_until(lambda: trickle.last_ok_sent_s >= gone, 60, lambda: summary(trickle.outcomes), 1.0)
        trickle_outcomes = await trickle.stop()

    print(
        f"scaled out after {up_s:.0f}s of burst, back in {down_s:.0f}s after it; "
        f"{summary(burst_outcomes)}, {summary(trickle_outcomes)}"
    )
    # Not one request failed or was refused, and none is retried here: every one is a whole stream.
    assert all(ok(o) for o in burst_outcomes) and len(burst_outcomes) >= BURST, summary(burst_outcomes)
    assert all(ok(o) for o in trickle_outcomes), summary(trickle_outcomes)
    outcomes = [*burst_outcomes, *trickle_outcomes]
    billed, expected = await asyncio.to_thread(wait_for_ledger, stack.base_url, key, before, outcomes)
    assert billed == expected, f"billed (output tokens, nano-DKK) {billed} != told to the clients {expected}"


def summary(outcomes: list[Outcome]) -> str:
    return str(Counter((o.status, o.error_code or o.transport_error, o.done) for o in outcomes))
