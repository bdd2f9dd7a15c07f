"""The HTTP surface: a FastAPI app with OpenAI's routes, usage, administration (``admin.py``) and the dashboard,
bearer-key auth, body limits, rate-limit headers and OpenAI-shaped errors.

Built by ``create_app`` from a service and an ``Accounts`` client, so tests run it in-process; the Ray Serve ingress
serves the same app. It never logs bodies; unexpected failures are logged by exception type only.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from deployments.errors import (
    AnkerError,
    InternalError,
)
from deployments.openai import openapi, sse
from deployments.openai.accounts import Accounts
from deployments.openai.accounts import authenticate as authenticate_with
from deployments.openai.control_app import accounts_app, finish_app, limit_headers
from deployments.openai.errors import error_body, error_response
from deployments.openai.parsing import parse_request
from deployments.openai.protocol import (
    UNSUPPORTED_CHAT,
    UNSUPPORTED_COMPLETION,
    ChatCompletionRequest,
    CompletionRequest,
)
from deployments.openai.serving import OpenAIService
from deployments.openai.usage import RequestContext
from deployments.server.requests import read_body
from observability import metrics

logger = logging.getLogger("ray.serve")


def create_app(
    service: OpenAIService,
    accounts: Accounts,
    max_body_bytes: int,
    server_request_id: Callable[[], str | None] = lambda: None,
) -> FastAPI:
    """The app. ``server_request_id`` gives the id the hosting server already assigned (and sends as
    ``X-Request-Id``), so logs and responses share one id; without one, the app makes and sends its own."""
    app = accounts_app(service, accounts)

    def request_id(prefix: str) -> tuple[str, dict[str, str]]:
        assigned = server_request_id()
        if assigned:
            return f"{prefix}-{assigned}", {}
        own = f"{prefix}-{uuid.uuid4().hex}"
        return own, {"X-Request-Id": own}

    async def _serve(request: Request, prefix: str, run: Any) -> Response:
        record = await authenticate_with(request, accounts.verify)
        rid, headers = request_id(prefix)
        ctx = RequestContext(record, rid, f"{prefix}-{uuid.uuid4().hex}", headers)
        body = await read_body(request, max_body_bytes)
        started = time.monotonic()

        def done(status: int) -> None:
            metrics.request_done(ctx.model or metrics.NO_MODEL, status, time.monotonic() - ctx.started_s)

        try:
            result = await run(body, ctx)
        except AnkerError as error:
            if "x-ratelimit-limit-requests" not in ctx.headers:
                ctx.headers.update(await limit_headers(accounts, record))
            done(error.status)
            return error_response(error, ctx.headers)
        except Exception as error:  # never let a traceback (which could quote input) reach a log or a client
            logger.error("request %s failed with %s", rid, type(error).__name__)
            done(500)
            return error_response(InternalError("The server had an error while processing your request."), headers)
        if isinstance(result, dict):
            headers["X-Processing-Ms"] = str(int((time.monotonic() - started) * 1000))
            done(200)
            return JSONResponse(result, headers=headers)
        return StreamingResponse(
            _guard_stream(result, lambda: done(200)),
            media_type="text/event-stream",
            headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.post("/v1/chat/completions", **openapi.CHAT_COMPLETIONS)
    async def chat_completions(request: Request) -> Response:
        async def run(body: bytes, ctx: RequestContext) -> Any:
            req = parse_request(ChatCompletionRequest, body, UNSUPPORTED_CHAT)
            return await service.chat(req, ctx)

        return await _serve(request, "chatcmpl", run)

    @app.post("/v1/completions", **openapi.COMPLETIONS)
    async def completions(request: Request) -> Response:
        async def run(body: bytes, ctx: RequestContext) -> Any:
            req = parse_request(CompletionRequest, body, UNSUPPORTED_COMPLETION)
            return await service.completion(req, ctx)

        return await _serve(request, "cmpl", run)

    return finish_app(app, accounts, max_body_bytes)


async def _guard_stream(events: AsyncIterator[bytes], on_done: Callable[[], None]) -> AsyncIterator[bytes]:
    """Passes events through; an unexpected failure mid-stream ends the stream cleanly instead of hanging it.
    ``on_done`` runs once the stream has ended, however it ended (its status line went out as 200)."""
    try:
        async for chunk in events:
            yield chunk
    except (asyncio.CancelledError, GeneratorExit):
        raise
    except Exception as error:
        logger.error("stream failed with %s", type(error).__name__)
        yield sse.event(error_body(InternalError("The server had an error while streaming the response.")))
        yield sse.DONE
    finally:
        on_done()
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()
