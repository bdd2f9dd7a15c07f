"""Faults under concurrent streaming load on a real stack (conftest's ``second_app``: two engine replicas, the
billing actor, its ledger on a PostgreSQL server of its own), all on loopback: an engine replica killed mid-stream,
the billing actor killed, PostgreSQL stopped and started again, clients leaving their streams.

After each: the service recovers by itself (every replica running again, requests served), every client got a
clean answer (a finished stream, or an error in OpenAI's shape; never a hung stream; a dropped connection only for
the streams of the engine replica that died, which was their HTTP server), and the ledger bills exactly the usage
the clients were told, with no record lost or doubled.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable

import httpx
import psutil
import pytest

from deployments.billing.ledger import Ledger
from deployments.server.gate import PROGRESS_INTERVAL_S
from testkit.faults import FIGURES_ENV
from tests.conftest import BILLING, SECOND_MODEL, EngineKill, SecondApp, Stack, haproxies
from tests.traffic import Outcome, SteadyLoad, during, ledger_totals, wait_for_ledger

pytestmark = pytest.mark.stack

CLIENTS = 6  # under the app's 2 x 4 running + 4 queued: a refusal here would be a fault's doing
LONG_STREAM_TOKENS = 800  # seconds of generation each: a kill that finds one running lands mid-way
CUT_STREAM_TOKENS = 200  # streams are running at every moment of a fault that needs no aim (and end sooner)
TRAFFIC_WAIT_S = 180  # for the clients' streams before and after a fault (an engine replica restarts in between)


# When the last fault ran (time.monotonic(), its start and end), for its figures (``record_figures``).
fault_window: list[float] = [0.0, 0.0]


async def under_load(app: SecondApp, key: str, fault: Callable[[], None], max_tokens: int = 48) -> list[Outcome]:
    """Streams from ``CLIENTS`` clients before, during and after ``fault`` (which returns once it is over). The fault
    begins once streams are delivering, and the load ends once the clients have been served ``CLIENTS`` streams
    sent after the fault was over."""
    load = SteadyLoad(app.base_url, key, SECOND_MODEL, CLIENTS, max_tokens=max_tokens)
    running = asyncio.create_task(load.run())
    try:
        await load.wait_for(lambda: load.receiving > 0, TRAFFIC_WAIT_S, "streams delivering before the fault")
        fault_window[0] = time.monotonic()
        await asyncio.to_thread(fault)
        over = fault_window[1] = time.monotonic()
        await load.wait_for(lambda: load.served_since(over) >= CLIENTS, TRAFFIC_WAIT_S, "streams after the fault")
    finally:
        load.stop()
    return await running


def assert_clean_and_billed(
    app: SecondApp,
    key: str,
    before: dict[str, int],
    outcomes: list[Outcome],
    cut: list[Outcome] | None = None,
    besides: tuple[int, int] = (0, 0),
    since_s: float = 0.0,
) -> None:
    """Every request but the ``cut`` ones got a clean answer, the last ones were served, and the ledger bills what
    the clients were told (and ``besides``: the cut streams' (output tokens, nano-DKK), checked on their own)."""
    assert outcomes
    unclean = [o for o in outcomes if not o.clean and o not in (cut or [])]
    assert not unclean, [o.summary(since_s) for o in unclean[:5]]
    # A fault never turns a valid key away (it did when two stacks shared a fallback proxy: see the test below).
    refused = [o for o in outcomes if o.status in (401, 403)]
    assert not refused, [o.summary(since_s) for o in refused[:5]]
    # The service recovered by itself: the last requests of the run were served.
    assert all(o.status == 200 and o.error_code is None for o in outcomes[-CLIENTS:]), outcomes[-CLIENTS:]
    billed, seen = wait_for_ledger(app.base_url, key, before, outcomes, besides=besides)
    expected = (seen[0] + besides[0], seen[1] + besides[1])
    record_figures(outcomes, cut or [], billed, seen, besides)
    assert billed == expected, f"billed (output tokens, nano-DKK) {billed} != seen by clients {seen} + {besides}"


def _ending(outcome: Outcome, cut: list[Outcome]) -> str:
    if outcome in cut:
        return "cut" if outcome.status == 200 else f"{outcome.status}"  # a transport error: no answer at all
    if outcome.status == 200 and outcome.done and not outcome.error_code:
        return "served"
    if outcome.status == 200:
        return f"200 then {outcome.error_code}"  # a stream that ended with an error event
    return f"{outcome.status} {outcome.error_code or ''}".strip()


def record_figures(
    outcomes: list[Outcome],
    cut: list[Outcome],
    billed: tuple[int, int],
    seen: tuple[int, int],
    besides: tuple[int, int],
) -> None:
    """The fault's figures, for ``python -m loadtests.faults`` (which names the file in ``ANKER_FAULT_FIGURES``):
    requests during it, how they ended, and the ledger against what clients were told."""
    path = os.environ.get(FIGURES_ENV)
    if not path:
        return
    began, over = fault_window
    during_fault = [o for o in outcomes if o.started_s <= over and o.ended_s >= began]
    endings = Counter(_ending(o, cut) for o in during_fault)
    figures = {
        "test": os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0].split("::")[-1],
        "requests": len(outcomes),
        "fault_s": round(over - began, 1),
        "during_fault": len(during_fault),
        "endings": dict(endings),
        "refusals_with_retry_after": sum(1 for o in outcomes if o.status in (429, 503, 504) and o.retry_after),
        "refusals": sum(1 for o in outcomes if o.status in (429, 503, 504)),
        "billed": list(billed),
        "told": list(seen),
        "cut_billed": list(besides),
        "difference": [billed[0] - seen[0] - besides[0], billed[1] - seen[1] - besides[1]],
    }
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(figures) + "\n")


def most_in_a_window(times: list[float], window_s: float) -> int:
    """The most of ``times`` (sorted) within any ``window_s``."""
    return max((bisect.bisect_right(times, t + window_s) - i for i, t in enumerate(times)), default=0)


def rows_once_there(
    app: SecondApp, tenant: str, status: str, ids: set[str], timeout_s: float
) -> dict[str, dict[str, object]]:
    """The tenant's ledger rows of ``status`` by request id, once they hold ``ids`` or ``timeout_s`` passed (usage
    reaches the ledger asynchronously): the caller asserts what they hold."""
    ledger = Ledger(app.ledger.url)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            rows = {str(r["request_id"]): r for r in ledger.events(tenant) if r["status"] == status}
            if ids <= set(rows) or time.monotonic() > deadline:
                return rows
            time.sleep(2)
    finally:
        ledger.dispose()


def cut_streams_billed(app: SecondApp, tenant: str, cut: list[Outcome], finished: list[Outcome]) -> tuple[int, int]:
    """Issue 15, hole 9: the streams a dead replica was delivering are billed from the progress its spool kept, as
    the service's failure (``engine_unavailable``): each one its client got a chunk of, for its prompt and for what
    it was sent, less at most what it was sent in one ``PROGRESS_INTERVAL_S`` (SECURITY.md); never more than it was
    sent. Returns their (output tokens, nano-DKK)."""
    delivering = {o.answer_id: o for o in cut if o.answer_id}
    assert delivering, "the kill cut no stream its client had a chunk of"  # it lands while vLLM is generating
    # The replica that replaces the dead one adopts its spool as it starts.
    rows = rows_once_there(app, tenant, "engine_unavailable", set(delivering), timeout_s=180)
    assert set(delivering) <= set(rows), f"cut streams not billed: {set(delivering) - set(rows)}"
    charged = [r for r in rows.values() if r["cost_nano_dkk"]]  # (a request the engine failed before output: free)
    assert len(charged) <= len(cut), f"{len(charged)} requests billed as cut, {len(cut)} were"  # none twice, none other
    # Tokens per chunk, as the finished streams had them (a chunk holds whole characters: random weights' bytes can
    # take a few tokens to make one).
    per_chunk = max(math.ceil(o.usage["completion_tokens"] / max(1, o.content_chunks - 1)) for o in finished)
    for answer_id, outcome in delivering.items():
        row, chunks = rows[answer_id], outcome.content_chunks - 1  # the first chunk says the role: no token
        unnoted = most_in_a_window(outcome.chunk_times, PROGRESS_INTERVAL_S + 0.25)  # and the client's own delays
        assert row["prompt_tokens"] > 0, row
        assert chunks - unnoted <= row["completion_tokens"] <= per_chunk * (chunks + 2), (row, outcome.summary(0))
    return sum(r["completion_tokens"] for r in rows.values()), sum(r["cost_nano_dkk"] for r in rows.values())


def test_two_stacks_on_one_host_each_have_their_own_fallback_proxy(stack: Stack, second_app: SecondApp) -> None:
    """HAProxy falls back to Serve's own proxy when no engine replica can take a request (as while one restarts).
    Serve binds that proxy with SO_REUSEPORT, so two stacks' proxies on one port share it, and the kernel hands
    each some of the other's requests: a valid key was refused with 401 by the other stack's billing. Each stack's
    fallback proxy listens alone, on its own port."""
    ports = [s.config.server.fallback_proxy_port for s in (stack, second_app)]
    assert ports[0] != ports[1], ports
    for port in ports:
        listening = {
            c.pid for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port
        }
        assert len(listening) == 1, f"port {port}: processes {listening} listen on it"


def test_an_engine_replica_killed_mid_stream(second_app: SecondApp) -> None:
    """The engine replica is the HTTP server of its streams: when its process dies, so do their connections, and no
    one is left to tell their clients why (as with `vllm serve`). Those streams end without `[DONE]` and without
    usage, and bill nothing the client was not told; every other request is answered cleanly, and the service
    recovers by itself. The ledger bills them from what the dead replica's spool kept of them."""
    key = second_app.new_key("faults-engine-killed")
    before = ledger_totals(second_app.base_url, key)
    kills: list[EngineKill] = []

    def kill() -> None:
        kills.append(second_app.kill_engine_mid_generation(SECOND_MODEL, 2))

    outcomes = asyncio.run(under_load(second_app, key, kill, max_tokens=LONG_STREAM_TOKENS))
    [killed] = kills
    # Open at the kill and never finished: streaming (200 without [DONE]) or taken by the replica but not yet
    # answered (its connection dropped before the response began).
    cut = [
        o
        for o in outcomes
        if not o.done
        and o.started_s <= killed.killed_s
        and o.ended_s >= killed.killing_s
        and (o.status == 200 or isinstance(o.status, str))
    ]
    open_then = during(outcomes, killed.killed_s, killed.killed_s)
    seen = Counter((o.status, o.error_code, o.done) for o in outcomes)
    assert cut, f"the kill cut no stream ({killed}); streams open at the kill: {open_then}; all: {seen}"
    for outcome in cut:  # its connection ended with the replica's process: never a hang, never a made-up end
        assert outcome.usage is None and outcome.ended_s - killed.killed_s < 30, outcome
    finished = [o for o in outcomes if o.usage]
    besides = cut_streams_billed(second_app, "faults-engine-killed", cut, finished)
    assert_clean_and_billed(second_app, key, before, outcomes, cut, besides, since_s=killed.killed_s)


def test_a_vllm_engine_core_killed_mid_generation(second_app: SecondApp) -> None:
    """vLLM's engine core process of one engine replica dies (SIGKILL) while it generates. The replica lives on and
    finds its engine dead (vLLM's client watches the process): its streams end with an ``engine_unavailable`` error
    event, what reaches it meanwhile is refused with 503 and Retry-After, its health check fails and Serve replaces
    it. Each cut stream is billed what it was sent, by the replica itself."""
    key = second_app.new_key("faults-engine-core-killed")
    before = ledger_totals(second_app.base_url, key)
    kills: list[EngineKill] = []

    def kill() -> None:
        kills.append(second_app.kill_engine_mid_generation(SECOND_MODEL, 2, core=True))

    outcomes = asyncio.run(under_load(second_app, key, kill, max_tokens=CUT_STREAM_TOKENS))
    [killed] = kills
    cut = [o for o in outcomes if o.cut_off]
    seen = Counter((o.status, o.error_code, o.done) for o in outcomes)
    assert cut, f"the engine core's death cut no stream ({killed}): {seen}"
    assert all(o.error_code == "engine_unavailable" and o.done for o in cut), [o.summary(killed.killed_s) for o in cut]
    finished = [o for o in outcomes if o.usage]
    besides = cut_streams_billed(second_app, "faults-engine-core-killed", cut, finished)
    assert_clean_and_billed(second_app, key, before, outcomes, besides=besides, since_s=killed.killed_s)


def test_the_http_entry_killed_under_load(second_app: SecondApp) -> None:
    """HAProxy, the node's HTTP entry, dies (SIGKILL) while streams run through it. Ray's proxy actor finds it gone
    (its health check), Serve restarts the proxy and with it HAProxy. Meanwhile the node has no HTTP entry: its
    streams end with their connections, and a new connection is refused until HAProxy listens again (a cluster
    puts several entries behind its load balancer). The engine replicas live on: each cut stream is metered as a
    client that left, billed what its replica produced for it (what its client got, and what was on its way)."""
    key = second_app.new_key("faults-http-entry-killed")
    before = ledger_totals(second_app.base_url, key)
    window: list[float] = []

    def kill() -> None:
        entry = haproxies(second_app.config)  # the one serving, and any a reload left finishing its streams
        assert entry, "no HAProxy of the stack runs"
        window.append(time.monotonic())
        for process in entry:
            process.kill()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # a new HAProxy (Serve restarts the proxy that ran it) that answers
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{second_app.base_url}/healthz", timeout=5).status_code == 200:
                    window.append(time.monotonic())
                    return
            time.sleep(0.2)
        raise AssertionError("HAProxy did not come back within 120 s")

    outcomes = asyncio.run(under_load(second_app, key, kill, max_tokens=CUT_STREAM_TOKENS))
    killing, back = window
    # Streams open at the kill: their connections ended with HAProxy. Requests sent while it was down: refused.
    unanswered = ("ConnectError", "RemoteProtocolError", "ReadError")
    cut = [
        o
        for o in outcomes
        if not o.done
        and o.started_s <= back
        and o.ended_s >= killing
        and (o.status in unanswered or (o.status == 200 and o.transport_error is not None))
    ]
    assert any(o.status == 200 for o in cut), f"the kill cut no stream: {during(outcomes, killing, killing)}"
    delivering = {o.answer_id: o for o in cut if o.answer_id}
    rows = rows_once_there(second_app, "faults-http-entry-killed", "cancelled", set(delivering), timeout_s=60)
    assert set(delivering) <= set(rows), f"cut streams not billed: {set(delivering) - set(rows)}"
    assert len(rows) <= len(cut), f"{len(rows)} requests billed as left, {len(cut)} were cut"
    for answer_id, outcome in delivering.items():
        # Metered by the replica itself: all it sent, at least what the client got (the first chunk says the role).
        assert rows[answer_id]["completion_tokens"] >= outcome.content_chunks - 1, (rows[answer_id], outcome)
    besides = (sum(r["completion_tokens"] for r in rows.values()), sum(r["cost_nano_dkk"] for r in rows.values()))
    assert_clean_and_billed(second_app, key, before, outcomes, cut, besides, since_s=killing)


def test_the_billing_actor_killed_under_load(second_app: SecondApp) -> None:
    key = second_app.new_key("faults-billing-killed")
    before = ledger_totals(second_app.base_url, key)
    outcomes = asyncio.run(under_load(second_app, key, lambda: second_app.kill_replica(BILLING, 1)))
    assert_clean_and_billed(second_app, key, before, outcomes)


def test_postgresql_stopped_and_started_under_load(second_app: SecondApp) -> None:
    key = second_app.new_key("faults-postgresql-stopped")
    before = ledger_totals(second_app.base_url, key)

    def outage() -> None:
        second_app.ledger.stop("fast")
        time.sleep(15)  # the outage itself: usage reports pile up in the outbox meanwhile
        second_app.ledger.start()

    outcomes = asyncio.run(under_load(second_app, key, outage))
    assert_clean_and_billed(second_app, key, before, outcomes)


def test_streams_their_clients_leave_keep_the_model_ready(second_app: SecondApp) -> None:
    """Issue 15, hole 10: a stream that ended without a finish reason used to mark its model not ready (the
    ingress, then a deployment of its own, saw it as a lost replica), and under load every request then got 503.
    Since the engine replica serves the API itself, readiness is its own probe's alone: clients that leave
    mid-stream change nothing, the model stays ready and every other request is served."""
    key = second_app.new_key("faults-streams-left")
    leaving = second_app.new_key("faults-streams-left-leaving")
    before = ledger_totals(second_app.base_url, key)
    health: list[int] = []

    def leave_streams() -> None:
        body = {"model": SECOND_MODEL, "messages": [{"role": "user", "content": "Fortæl en lang historie."}],
                "max_tokens": 200, "stream": True}  # fmt: skip
        headers = {"Authorization": f"Bearer {leaving}"}
        for _ in range(12):
            with httpx.stream("POST", f"{second_app.base_url}/v1/chat/completions", json=body, headers=headers,
                              timeout=60) as r:  # fmt: skip
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        break  # leaves after its first chunk
            health.append(httpx.get(f"{second_app.base_url}/healthz", timeout=30).status_code)

    outcomes = asyncio.run(under_load(second_app, key, leave_streams))
    assert health == [200] * 12
    assert not [o for o in outcomes if o.status == 503], Counter((o.status, o.error_code) for o in outcomes)
    assert_clean_and_billed(second_app, key, before, outcomes)
