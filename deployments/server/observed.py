"""What the engine replica's door tells operators, and how much it takes at once.

``RequestMetrics`` times each call of the model (a POST): its duration and status, and for a stream the first event
and the gaps between events (an event carries a token, or a few). Labels are the model and the status code only;
nothing of a request's content is read.

``Capacity`` is the replica's back-pressure: beyond ``limit`` calls at once (what vLLM runs and what waits in its
queue), a call is answered at once with 503 ``engine_overloaded`` and Retry-After in OpenAI's shape, instead of
waiting in a queue until the client times out.
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.errors import EngineOverloaded
from deployments.openai.errors import error_response
from observability import metrics

EVENT_STREAM = b"text/event-stream"


class RequestMetrics:
    def __init__(self, app: ASGIApp, model: str) -> None:
        self.app = app
        self.model = model

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 500  # what the client gets if the app fails before it answers (Starlette's answer then)
        streamed = False
        last: float | None = None

        async def timed_send(message: Message) -> None:
            nonlocal status, streamed, last
            if message["type"] == "http.response.start":
                status = int(message["status"])
                streamed = any(k == b"content-type" and v.startswith(EVENT_STREAM) for k, v in message["headers"])
            elif streamed and message["type"] == "http.response.body" and message.get("body"):
                now = time.monotonic()
                if last is None:
                    metrics.first_token(self.model, now - started)
                else:
                    metrics.inter_token(self.model, now - last)
                last = now
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            metrics.request_done(self.model, status, time.monotonic() - started)


class Capacity:
    def __init__(self, app: ASGIApp, limit: int, retry_after_s: int) -> None:
        self.app = app
        self.limit = limit
        self.running = 0
        self._refusal = EngineOverloaded(
            "The model is busy with other requests. Please retry shortly.", retry_after_s=retry_after_s
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        if self.running >= self.limit:
            await error_response(self._refusal)(scope, receive, send)
            return
        self.running += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.running -= 1
