"""One request through vLLM's serving layer, the way every endpoint does it: the body checked against the
endpoint's allow-list, validated into vLLM's request model, handed to vLLM's handler, and its answer (a response,
a stream or an error) turned into what the client gets, with every error in Anker's words.

Endpoints (``chat.py``, ``completions.py``, ``responses.py``) only say which handler and which model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive

from deployments.errors import AnkerError, EngineTimeout, EngineUnavailable, InvalidValue, ModelNotFound
from deployments.openai.errors import error_body, error_response
from deployments.server.metering import RequestMeter, current_meter
from deployments.server.requests import ALLOWED, checked_body, from_vllm, read_body, refuse_images

logger = logging.getLogger("ray.serve")

# The status of a request whose client left before its answer (nginx's "client closed request"): nobody receives
# it, but the request's span, metrics and usage line say so.
CLIENT_LEFT = 499


def _engine_failed() -> EngineUnavailable:
    """The engine failed the request, not the request the engine: the client may retry it."""
    return EngineUnavailable("The model could not complete the request. Please retry.", retry_after_s=2)


def _timed_out(meter: RequestMeter | None, streamed: bool) -> EngineTimeout | None:
    """Why the engine request was aborted, if its output came too late (``metering.Deadlines``)."""
    if meter is None or meter.stalled_s is None:
        return None
    logger.warning("engine request aborted: no output within %g s", meter.stalled_s)
    if streamed:
        return EngineTimeout(f"The model produced no output for {meter.stalled_s:g} s. Please retry.")
    return EngineTimeout(f"The model did not answer within {meter.stalled_s:g} s. Please retry, or stream the answer.")


def _invalid(exc: ValidationError, endpoint: str) -> InvalidValue:
    """A validation error of vLLM's request model, naming the parameter (if it is one) and never the value."""
    first = exc.errors(include_input=False, include_url=False)[0]
    loc = [str(part) for part in first["loc"] if not isinstance(part, int)]
    name = loc[0] if loc and loc[0] in ALLOWED[endpoint] else None
    return InvalidValue(f"Invalid value for '{name}'." if name else "Invalid value in the request.", name)


def _streamed_error(payload: str, meter: RequestMeter | None) -> AnkerError:
    """A streamed error of vLLM's (its ``{"error": ...}``) in Anker's words: output that came too late is
    ``engine_timeout``; the engine's failure mid-stream is ``engine_unavailable``, as it is before the stream
    starts (``_failed``)."""
    if (late := _timed_out(meter, streamed=True)) is not None:
        return late
    if meter is not None and meter.engine_failures:
        return _engine_failed()
    try:
        return from_vllm(json.loads(payload))
    except ValueError:
        return from_vllm({})


async def _chat_events(stream: AsyncIterator[str], meter: RequestMeter | None) -> AsyncIterator[bytes | str]:
    async for event in stream:
        if event.startswith('data: {"error"'):
            yield b"data: " + json.dumps(error_body(_streamed_error(event[6:], meter))).encode() + b"\n\n"
        else:
            yield event


def _responses_error(meter: RequestMeter | None) -> str:
    error = _streamed_error('{"error": {"code": 500}}', meter)
    data = json.dumps({"type": "error", "code": error.code, "message": error.message, "param": None})
    return f"event: error\ndata: {data}\n\n"


async def _responses_events(stream: AsyncIterator[Any], meter: RequestMeter | None) -> AsyncIterator[str]:
    try:
        async for event in stream:
            kind = getattr(event, "type", "unknown")
            if kind == "error":
                yield _responses_error(meter)
            else:
                yield f"event: {kind}\ndata: {event.model_dump_json(indent=None, by_alias=True)}\n\n"
    except Exception:
        # vLLM's Responses stream ends a generation that fails by raising (its handler of ``GenerationError``
        # validates vLLM's error body as an event, which it is not): the stream ends with Anker's error event.
        if meter is None or meter.stalled_s is None:
            raise
        yield _responses_error(meter)


def _refusal(meter: RequestMeter | None) -> AnkerError | None:
    """Why admission refused the request, if it did (``metering.py``)."""
    if meter is None or meter.refusal is None:
        return None
    if isinstance(meter.refusal, AnkerError):
        return meter.refusal
    logger.error("admission failed: %s", type(meter.refusal).__name__)
    return from_vllm({"error": {"code": 500}})


def _failed(exc: Exception, endpoint: str) -> AnkerError:
    """An exception of vLLM's handler, in Anker's words."""
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

    if isinstance(exc, AnkerError):
        return exc
    if isinstance(exc, (EngineGenerateError, EngineDeadError)):  # the engine failed, not the request: retry it
        logger.error("%s request failed in the engine: %s", endpoint, type(exc).__name__)
        return _engine_failed()
    if isinstance(exc, VLLMValidationError):  # vLLM's checks of the request against the model (context length, …)
        return from_vllm({"error": {"code": 400, "message": str(exc), "param": exc.parameter}})
    if isinstance(exc, ValueError):  # how vLLM refuses a request it cannot run (a tool_choice naming no tool)
        return from_vllm({"error": {"code": 400}})
    logger.error("%s request failed in vLLM's serving layer: %s", endpoint, type(exc).__name__)
    return from_vllm({"error": {"code": 500}})


async def _until_admitted(events: AsyncIterator[Any], meter: RequestMeter) -> list[Any]:
    """The events a stream sends before admission has answered (or before it ends, if it never reaches the engine),
    held back so that a refusal is answered with its status instead of a stream that fails."""
    head: list[Any] = []
    if meter.settled:
        return head
    async for event in events:
        head.append(event)
        if meter.settled:
            break
    return head


async def _chained(head: list[Any], rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    for event in head:
        yield event
    async for event in rest:
        yield event


async def serve(
    request: Request,
    endpoint: str,
    request_model: type[BaseModel],
    create: Callable[[Any, Request], Awaitable[Any]],
    served_model: str,
) -> Response:
    """Runs one request of ``endpoint`` (chat, completions or responses) through ``create``, vLLM's handler for it.

    Once the body is read, a client that leaves ends the request at once, as vLLM's own ``with_cancellation`` does:
    its engine requests are aborted (a long prefill does not run on for nobody) and the meter reports what the
    engine did. A stream's response, once started, watches for that itself."""
    try:
        body = checked_body(await read_body(request, request.app.state.max_body_bytes), endpoint)
    except AnkerError as error:
        return error_response(error)
    answer = asyncio.ensure_future(_answer(request, endpoint, body, request_model, create, served_model))
    left = asyncio.ensure_future(_client_left(request.receive))
    try:
        await asyncio.wait((answer, left), return_when=asyncio.FIRST_COMPLETED)
    finally:
        left.cancel()
        if not answer.done():
            answer.cancel()  # the client left (or this request is being cancelled): the engine's work stops
            with contextlib.suppress(asyncio.CancelledError):
                await answer
    if answer.cancelled():
        return Response(status_code=CLIENT_LEFT)  # nobody reads it; the meter calls the request cancelled
    return answer.result()


async def _client_left(receive: Receive) -> None:
    """Returns when the client has gone (the body has been read: any other message is not the request's)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _answer(
    request: Request,
    endpoint: str,
    body: dict[str, Any],
    request_model: type[BaseModel],
    create: Callable[[Any, Request], Awaitable[Any]],
    served_model: str,
) -> Response:
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse
    from vllm.exceptions import VLLMValidationError

    meter = current_meter()
    try:
        if body.get("model") != served_model:
            raise ModelNotFound.unnamed()
        if not request.app.state.reads_images:
            refuse_images(body, endpoint)
        try:
            parsed = request_model.model_validate(body)
        except ValidationError as exc:
            raise _invalid(exc, endpoint) from None
        except VLLMValidationError as exc:  # a check of vLLM's own model (an empty `tools`, …)
            raise _failed(exc, endpoint) from None
        try:
            answer = await create(parsed, request)
        except Exception as exc:
            raise _refusal(meter) or _timed_out(meter, streamed=False) or _failed(exc, endpoint) from None
    except AnkerError as error:
        return error_response(error)
    if (refused := _refusal(meter)) is not None:
        return error_response(refused)
    if isinstance(answer, ErrorResponse):
        return error_response(from_vllm(answer.model_dump(mode="json")))
    if isinstance(answer, BaseModel):
        return JSONResponse(answer.model_dump(mode="json", by_alias=True))
    events = _responses_events(answer, meter) if endpoint == "responses" else _chat_events(answer, meter)
    if meter is not None:
        try:
            head = await _until_admitted(events, meter)
        except asyncio.CancelledError:
            await events.aclose()  # type: ignore[attr-defined]
            raise
        if (refused := _refusal(meter)) is not None:
            await events.aclose()  # type: ignore[attr-defined]
            return error_response(refused)
        events = _chained(head, events)
    return StreamingResponse(events, media_type="text/event-stream")
