"""The engine replica's back-pressure (deployments/server/observed.py::Capacity): beyond its limit of calls at once
a call is answered at once with 503 ``engine_overloaded`` and Retry-After in OpenAI's shape; what it took runs on,
and once a call ends the next is taken."""

from __future__ import annotations

import asyncio

import httpx
from starlette.types import Receive, Scope, Send

from deployments.server.observed import Capacity


class SlowModel:
    """An app whose calls each wait until the test lets them go."""

    def __init__(self) -> None:
        self.started = 0
        self.go = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] == "POST":
            self.started += 1
            await self.go.wait()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})


async def test_calls_beyond_the_limit_are_refused_at_once_and_the_taken_ones_finish() -> None:
    model = SlowModel()
    capacity = Capacity(model, limit=2, retry_after_s=2)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=capacity), base_url="http://replica") as client:
        taken = [asyncio.create_task(client.post("/v1/chat/completions", json={})) for _ in range(2)]
        while model.started < 2:
            await asyncio.sleep(0.01)
        refused = await asyncio.wait_for(client.post("/v1/chat/completions", json={}), 5)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "2"
        assert refused.json()["error"] == {
            "message": "The model is busy with other requests. Please retry shortly.",
            "type": "service_unavailable_error",
            "param": None,
            "code": "engine_overloaded",
        }
        assert (await client.get("/healthz")).status_code == 200, "only calls of the model count, and wait"
        assert capacity.running == 2 and model.started == 2
        model.go.set()
        assert [r.status_code for r in await asyncio.gather(*taken)] == [200, 200]
        assert capacity.running == 0
        assert (await client.post("/v1/chat/completions", json={})).status_code == 200
