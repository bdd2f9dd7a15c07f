"""The ingress's drain gate (deployments/drain.py): running requests finish, new ones get 503 with Retry-After.

The whole drain (`anker down` with streams running) is tested on the real stack in tests/test_stack_restart.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from deployments.drain import DrainGate


def gated_app() -> tuple[DrainGate, asyncio.Event, asyncio.Event]:
    started, release = asyncio.Event(), asyncio.Event()

    async def stream(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield b"data: first\n\n"
            started.set()
            await release.wait()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    app = Starlette(routes=[Route("/v1/stream", stream, methods=["POST"]), Route("/healthz", healthz)])
    return DrainGate(app, retry_after_s=7), started, release


async def test_a_running_stream_finishes_while_new_requests_are_refused_in_openais_shape() -> None:
    gate, started, release = gated_app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gate), base_url="http://anker") as client:
        assert (await client.get("/healthz")).status_code == 200
        running = asyncio.create_task(client.post("/v1/stream"))
        await asyncio.wait_for(started.wait(), 5)
        assert gate.running == 1

        gate.draining = True
        refused = await client.post("/v1/chat/completions", json={"model": "m"})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "7"
        error = refused.json()["error"]
        assert error["code"] == "server_shutting_down" and error["type"] == "service_unavailable_error"
        assert set(error) == {"message", "type", "param", "code"}
        health = await client.get("/healthz")
        assert health.status_code == 503 and health.json() == {"status": "draining"}
        assert gate.running == 1, "refused requests are not counted as running"

        release.set()
        finished = await asyncio.wait_for(running, 5)
        assert finished.status_code == 200 and finished.text.endswith("data: [DONE]\n\n")
        assert gate.running == 0

        gate.draining = False  # the drain was called off
        assert (await client.get("/healthz")).status_code == 200


async def test_a_request_that_fails_is_no_longer_counted() -> None:
    async def broken(scope: object, receive: object, send: object) -> None:
        raise RuntimeError("boom")

    gate = DrainGate(broken)
    with pytest.raises(RuntimeError):
        await gate({"type": "http", "path": "/v1/models"}, None, None)
    assert gate.running == 0


async def test_a_health_probe_is_not_work_that_a_drain_waits_for() -> None:
    probing, answer = asyncio.Event(), asyncio.Event()

    async def healthz(request: Request) -> Response:
        probing.set()
        await answer.wait()
        return JSONResponse({"status": "ok"})

    gate = DrainGate(Starlette(routes=[Route("/healthz", healthz)]))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gate), base_url="http://anker") as client:
        probe = asyncio.create_task(client.get("/healthz"))
        await asyncio.wait_for(probing.wait(), 5)
        assert gate.running == 0
        answer.set()
        assert (await asyncio.wait_for(probe, 5)).status_code == 200


def test_a_drain_waits_for_every_applications_ingress_replicas() -> None:
    """The control application and each model application's engine replicas (they serve HTTP themselves); not the
    deployments behind them (billing, a model's ingress request router), nor another application's."""
    from types import SimpleNamespace

    from deployments.drain import _running_ingress_replicas

    def deployment(running: int) -> SimpleNamespace:
        return SimpleNamespace(replica_states={"RUNNING": running, "STARTING": 1})

    status = SimpleNamespace(
        applications={
            "anker": SimpleNamespace(deployments={"Control": deployment(2), "Billing": deployment(1)}),
            "model-qwen3-moe-tiny": SimpleNamespace(
                deployments={"Engine-qwen3-moe-tiny": deployment(3), "Router-qwen3-moe-tiny": deployment(1)}
            ),
            "someone-elses": SimpleNamespace(deployments={"Whatever": deployment(1)}),
        }
    )
    assert _running_ingress_replicas(status) == {"anker": 2, "model-qwen3-moe-tiny": 3}
