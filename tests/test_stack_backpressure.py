"""Back-pressure on a real stack: when every engine replica of a model holds all the calls its door takes (vLLM's
batch and its queue, deployments/server/observed.py::Capacity), the API answers at once with 503 `engine_overloaded`
in OpenAI's shape with Retry-After, instead of letting clients time out; the admitted requests finish, and the
ledger bills exactly what the clients were told.

Runs on conftest's ``second_app``: two engine replicas that take 4 running and 4 waiting calls each.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.conftest import SECOND_MODEL, SecondApp
from tests.traffic import CLIENT_TIMEOUT_S, ledger_totals, stream_chat, wait_for_ledger

pytestmark = pytest.mark.stack

BURST = 28  # well above 2 x (4 running + 4 waiting)


async def test_a_full_queue_is_answered_at_once_with_503_and_retry_after(second_app: SecondApp) -> None:
    key = second_app.new_key("backpressure")
    before = ledger_totals(second_app.base_url, key)
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S) as client:
        outcomes = await asyncio.gather(
            *(
                stream_chat(client, second_app.base_url, key, SECOND_MODEL, f"Spørgsmål nummer {i}?", 64)
                for i in range(BURST)
            )
        )
    served = [o for o in outcomes if o.status == 200]
    refused = [o for o in outcomes if o.status == 503]
    assert len(served) + len(refused) == BURST, [o.status for o in outcomes]  # no timeouts, no other answers
    assert served and refused, f"{len(served)} served, {len(refused)} refused"
    assert len(served) >= 8  # what the replicas and the queue hold is served
    for outcome in refused:
        assert outcome.error_code == "engine_overloaded" and outcome.error_type == "service_unavailable_error"
        assert outcome.retry_after == "2"
    for outcome in served:
        assert outcome.done and outcome.error_code is None and outcome.usage is not None
        assert outcome.usage["completion_tokens"] > 0

    billed, expected = wait_for_ledger(second_app.base_url, key, before, list(outcomes))
    assert billed == expected

    # Overload is not an outage: the model serves the next request at once.
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S) as client:
        after = await stream_chat(client, second_app.base_url, key, SECOND_MODEL, "Og nu?", 4)
    assert after.status == 200 and after.done
