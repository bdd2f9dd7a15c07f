"""The HTTP surface: a FastAPI app with OpenAI's routes, bearer-key auth, body limits and OpenAI-shaped errors.

Built by ``create_app`` from a service and a key verifier, so tests run it in-process; the Ray Serve ingress serves
the same app. It never logs bodies; unexpected failures are logged by exception type only.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse

from deployments.errors import (
    AnkerError,
    InternalError,
    InvalidApiKey,
    InvalidRequest,
    MethodNotAllowed,
    RequestTooLarge,
    RouteNotFound,
)
from deployments.keys import KeyRecord
from deployments.openai import sse
from deployments.openai.errors import error_body, error_response
from deployments.openai.protocol import (
    UNSUPPORTED_CHAT,
    UNSUPPORTED_COMPLETION,
    ChatCompletionRequest,
    CompletionRequest,
    parse_request,
)
from deployments.openai.serving import OpenAIService

logger = logging.getLogger("ray.serve")

NO_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth "
    "(i.e. Authorization: Bearer YOUR_KEY)."
)
BAD_KEY = "Incorrect API key provided. You can create a key with `anker keys create --tenant NAME`."


class KeyVerifier(Protocol):
    async def verify(self, key: str) -> KeyRecord | None: ...


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(f"The request body is larger than the limit of {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(f"The request body is larger than the limit of {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def create_app(
    service: OpenAIService,
    keys: KeyVerifier,
    max_body_bytes: int,
    server_request_id: Callable[[], str | None] = lambda: None,
) -> FastAPI:
    """The app. ``server_request_id`` gives the id the hosting server already assigned (and sends as
    ``X-Request-Id``), so logs and responses share one id; without one, the app makes and sends its own."""
    app = FastAPI(title="Anker", version="0.1.0", docs_url=None, redoc_url=None)

    def request_id(prefix: str) -> tuple[str, dict[str, str]]:
        assigned = server_request_id()
        if assigned:
            return f"{prefix}-{assigned}", {}
        own = f"{prefix}-{uuid.uuid4().hex}"
        return own, {"X-Request-Id": own}

    async def authenticate(request: Request) -> KeyRecord:
        key = _bearer(request)
        if key is None:
            raise InvalidApiKey(NO_KEY)
        record = await keys.verify(key)
        if record is None:
            raise InvalidApiKey(BAD_KEY)
        return record

    @app.exception_handler(AnkerError)
    async def _anker_error(request: Request, error: AnkerError) -> Response:
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> Response:
        if error.status_code == 404:
            return error_response(RouteNotFound(f"Unknown request URL: {request.method} {request.url.path}."))
        if error.status_code == 405:
            return error_response(MethodNotAllowed(f"Method {request.method} is not allowed on {request.url.path}."))
        return error_response(InvalidRequest(str(error.detail)))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> Response:
        # Only path/query parameters reach FastAPI's validation (bodies are parsed by parse_request); no input echo.
        return error_response(InvalidRequest("Invalid request parameters."))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> Response:
        logger.error("unexpected %s on %s %s", type(error).__name__, request.method, request.url.path)
        return error_response(InternalError("The server had an error while processing your request."))

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> Response:
        models = service.readiness()
        ready = all(models.values())
        body = {"status": "ok" if ready else "starting", "models": {m: {"ready": r} for m, r in models.items()}}
        return JSONResponse(body, status_code=200 if ready else 503, headers={} if ready else {"Retry-After": "5"})

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        await authenticate(request)
        return service.list_models()

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        await authenticate(request)
        return service.get_model(model_id)

    async def _serve(request: Request, prefix: str, run: Any) -> Response:
        await authenticate(request)
        rid, headers = request_id(prefix)
        body = await read_body(request, max_body_bytes)
        started = time.monotonic()
        try:
            result = await run(body, rid)
        except AnkerError as error:
            return error_response(error, headers)
        except Exception as error:  # never let a traceback (which could quote input) reach a log or a client
            logger.error("request %s failed with %s", rid, type(error).__name__)
            return error_response(InternalError("The server had an error while processing your request."), headers)
        if isinstance(result, dict):
            headers["X-Processing-Ms"] = str(int((time.monotonic() - started) * 1000))
            return JSONResponse(result, headers=headers)
        return StreamingResponse(
            _guard_stream(result),
            media_type="text/event-stream",
            headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        async def run(body: bytes, request_id: str) -> Any:
            req = parse_request(ChatCompletionRequest, body, UNSUPPORTED_CHAT)
            return await service.chat(req, request_id)

        return await _serve(request, "chatcmpl", run)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        async def run(body: bytes, request_id: str) -> Any:
            req = parse_request(CompletionRequest, body, UNSUPPORTED_COMPLETION)
            return await service.completion(req, request_id)

        return await _serve(request, "cmpl", run)

    return app


async def _guard_stream(events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Passes events through; an unexpected failure mid-stream ends the stream cleanly instead of hanging it."""
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
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()
