"""Faults under concurrent streaming load on the real stack (conftest's ``second_app``: two engine replicas, the
billing actor, its ledger on a PostgreSQL server of its own), all on loopback: an engine replica killed mid-stream,
the billing actor killed, PostgreSQL stopped and started again.

After each: the service recovers by itself (every replica running again, requests served), every client got a
clean answer (a finished stream, or an error in OpenAI's shape; never a hung stream or a dropped connection), and
the ledger bills exactly the usage the clients were told, with no record lost or doubled.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

import pytest

from tests.conftest import SECOND_MODEL, SecondApp
from tests.traffic import Outcome, ledger_totals, steady_load, wait_for_ledger

pytestmark = pytest.mark.stack

ENGINE = f"Engine-{SECOND_MODEL}"
CLIENTS = 6  # under the app's 2 x 4 running + 4 queued: a refusal here would be a fault's doing
LONG_STREAM_TOKENS = 400


async def under_load(app: SecondApp, key: str, fault: Callable[[], None], max_tokens: int = 48) -> list[Outcome]:
    """Streams from ``CLIENTS`` clients before, during and after ``fault`` (which returns once it is over)."""
    stop = asyncio.Event()
    load = asyncio.create_task(steady_load(app.base_url, key, SECOND_MODEL, CLIENTS, stop, max_tokens=max_tokens))
    await asyncio.sleep(8)  # streams are running on both replicas
    await asyncio.to_thread(fault)
    await asyncio.sleep(8)  # and go on after recovery
    stop.set()
    return await load


def assert_clean_and_billed(app: SecondApp, key: str, before: dict[str, int], outcomes: list[Outcome]) -> None:
    assert outcomes
    unclean = [o for o in outcomes if not o.clean]
    assert not unclean, unclean[:5]
    # The service recovered by itself: the last requests of the run were served.
    assert all(o.status == 200 and o.error_code is None for o in outcomes[-CLIENTS:]), outcomes[-CLIENTS:]
    billed, expected = wait_for_ledger(app.base_url, key, before, outcomes)
    assert billed == expected, f"billed (output tokens, nano-DKK) {billed} != seen by clients {expected}"


def test_an_engine_replica_killed_mid_stream(second_app: SecondApp) -> None:
    key = second_app.new_key("faults-engine-killed")
    before = ledger_totals(second_app.base_url, key)
    held: dict[str, int] = {}  # requests each replica held when the victim was chosen

    def busiest(alive: list[str]) -> str:
        """The live replica holding the most requests right now (Serve's count, asked of each replica): the kill
        must cut streams, whichever way the router spread the load. Waits until one holds some."""
        deadline = time.monotonic() + 60
        while True:
            held.clear()
            held.update(second_app.ongoing_requests(ENGINE))
            victim = max(alive, key=lambda name: held.get(name, 0))
            if held.get(victim, 0) > 0 or time.monotonic() > deadline:
                return victim
            time.sleep(0.5)

    def kill() -> None:
        second_app.kill_replica(ENGINE, 2, busiest)

    # Long streams (seconds each), so that the replica is in the middle of some when it is killed.
    outcomes = asyncio.run(under_load(second_app, key, kill, max_tokens=LONG_STREAM_TOKENS))
    assert max(held.values(), default=0) > 0, f"no replica held a request when one was killed: {held}"
    cut = [o for o in outcomes if o.cut_off]
    refused = [o for o in outcomes if o.status == 503 and o.error_code == "engine_unavailable"]
    seen = Counter((o.status, o.error_code, o.done) for o in outcomes)
    assert cut or refused, f"the kill reached no client (requests per replica before it: {held}): {seen}"
    for outcome in cut:  # cut mid-way: told what it is billed for, then the error, then the end of the stream
        assert outcome.error_code == "engine_unavailable" and outcome.usage is not None and outcome.done
    assert_clean_and_billed(second_app, key, before, outcomes)


def test_the_billing_actor_killed_under_load(second_app: SecondApp) -> None:
    key = second_app.new_key("faults-billing-killed")
    before = ledger_totals(second_app.base_url, key)
    outcomes = asyncio.run(under_load(second_app, key, lambda: second_app.kill_replica("Billing", 1)))
    assert_clean_and_billed(second_app, key, before, outcomes)


def test_postgresql_stopped_and_started_under_load(second_app: SecondApp) -> None:
    key = second_app.new_key("faults-postgresql-stopped")
    before = ledger_totals(second_app.base_url, key)

    def outage() -> None:
        second_app.postgres.stop("fast")
        time.sleep(15)
        second_app.postgres.start()

    outcomes = asyncio.run(under_load(second_app, key, outage))
    assert_clean_and_billed(second_app, key, before, outcomes)
