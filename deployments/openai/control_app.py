"""The routes every Anker HTTP app shares that need no engine: OpenAI-shaped error handlers, ``/healthz``, the
model list, usage (``accounts_app``), then administration (``admin.py``), the dashboard and tracing
(``finish_app``). The control application (``deployments/control.py``) is built on them.

It never logs bodies; unexpected failures are logged by exception type only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import QueryParams
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from deployments.billing.budgets import month_bounds, month_period
from deployments.dashboard import router as dashboard_router
from deployments.errors import (
    AnkerError,
    InternalError,
    InvalidRequest,
    InvalidValue,
    MethodNotAllowed,
    RouteNotFound,
)
from deployments.keys import KeyRecord
from deployments.openai import openapi
from deployments.openai.accounts import Accounts
from deployments.openai.accounts import authenticate as authenticate_with
from deployments.openai.admin import add_admin_routes
from deployments.openai.errors import error_response
from observability.tracing import TracingMiddleware

logger = logging.getLogger("ray.serve")

USAGE_QUERY = frozenset({"start", "end", "group_by", "start_time", "end_time"})
# OpenAI's usage API's query parameters that Anker does not take: an error may name them, as they are OpenAI's
# words; any other name is the client's own, and no error repeats it.
_OPENAI_USAGE_QUERY = frozenset(
    {"bucket_width", "limit", "page", "models", "project_ids", "user_ids", "api_key_ids", "batch"}
)


def parse_time(value: str, field: str) -> datetime:
    """Whole unix seconds (``1767225600``, also written ``1767225600.0`` or ``1.7672256e9``), an ISO date
    (``2026-11-01``) or an ISO datetime; naive values are UTC."""
    try:
        seconds = _number(value)
        if seconds is not None:
            if not (seconds.is_finite() and abs(seconds) < 10**12 and seconds == seconds.to_integral_value()):
                raise ValueError("not whole seconds in datetime's range")
            return datetime.fromtimestamp(int(seconds), UTC)
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        # In UTC here: an offset can carry a date at the edge of datetime's range past it (OverflowError).
        return moment.astimezone(UTC) if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    except (ValueError, OverflowError, OSError):
        raise InvalidValue(f"`{field}` must be unix seconds or an ISO 8601 date or time.", field) from None


def range_bound(query: QueryParams, names: tuple[str, str], default: datetime) -> tuple[str, datetime]:
    """One end of a usage range by its name or its alias (OpenAI's ``start_time``): the first given, the default if
    neither is. Every value given is checked, so that no invalid one is passed over in silence."""
    given = [(name, parse_time(value, name)) for name in names for value in query.getlist(name)]
    return given[0] if given else (names[0], default)


def _number(value: str) -> Decimal | None:
    try:
        return Decimal(value)
    except InvalidOperation:
        return None


class Catalog(Protocol):
    """The models a base URL serves, for ``/v1/models`` and ``/healthz``."""

    def list_models(self, key: KeyRecord) -> dict[str, Any]: ...

    def get_model(self, name: str, key: KeyRecord) -> dict[str, Any]: ...

    def readiness(self) -> dict[str, bool]: ...


async def limit_headers(accounts: Accounts, record: KeyRecord) -> dict[str, str]:
    try:
        return await accounts.rate_limit_headers(record)
    except AnkerError:
        return {}  # billing is away: the response goes out without the headers rather than not at all


def accounts_app(catalog: Catalog, accounts: Accounts) -> FastAPI:
    """An app with Anker's error handlers and the routes that need no engine: ``/healthz``, the models, usage.
    ``finish_app`` adds administration, the dashboard and tracing once the caller has added its own routes."""
    app = FastAPI(title="Anker", version="0.1.0", docs_url=None, redoc_url=None)
    app.openapi = openapi.published  # type: ignore[method-assign]  # FastAPI's way to serve its own document

    @app.exception_handler(AnkerError)
    async def _anker_error(request: Request, error: AnkerError) -> Response:
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> Response:
        headers = dict(error.headers or {})  # e.g. the dashboard's security headers on its 404s
        if error.status_code == 404:
            return error_response(RouteNotFound(f"Unknown request URL: {request.method} {request.url.path}."), headers)
        if error.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}."
            return error_response(MethodNotAllowed(message), headers)
        return error_response(InvalidRequest(str(error.detail)), headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> Response:
        # Only path/query parameters reach FastAPI's validation (bodies are parsed by parse_request); no input echo.
        return error_response(InvalidRequest("Invalid request parameters."))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> Response:
        route = getattr(request.scope.get("route"), "path", "-")  # the template: a path may hold a client's text
        logger.error("unexpected %s on %s %s", type(error).__name__, request.method, route)
        return error_response(InternalError("The server had an error while processing your request."))

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> Response:
        models = catalog.readiness()
        ready = all(models.values())
        body = {"status": "ok" if ready else "starting", "models": {m: {"ready": r} for m, r in models.items()}}
        return JSONResponse(body, status_code=200 if ready else 503, headers={} if ready else {"Retry-After": "5"})

    async def keyed(request: Request, answer: Callable[[KeyRecord], Any]) -> Response:
        """A keyed read-only route: its answer or error, with the key's rate-limit headers."""
        record = await authenticate_with(request, accounts.verify)
        headers = await limit_headers(accounts, record)
        try:
            return JSONResponse(await answer(record), headers=headers)
        except AnkerError as error:
            return error_response(error, headers)

    @app.get("/v1/models", **openapi.LIST_MODELS)
    async def list_models(request: Request) -> Response:
        async def answer(record: KeyRecord) -> Any:
            return catalog.list_models(record)

        return await keyed(request, answer)

    @app.get("/v1/models/{model_id:path}", **openapi.GET_MODEL)
    async def get_model(model_id: str, request: Request) -> Response:
        async def answer(record: KeyRecord) -> Any:
            return catalog.get_model(model_id, record)

        return await keyed(request, answer)

    @app.get("/v1/usage", **openapi.USAGE)
    async def usage(request: Request) -> Response:
        async def answer(record: KeyRecord) -> Any:
            query = request.query_params
            unknown = set(query) - USAGE_QUERY
            if unknown:
                name = next((n for n in sorted(unknown) if n in _OPENAI_USAGE_QUERY), None)
                raise InvalidValue(f"Unknown query parameter `{name}`." if name else "Unknown query parameter.", name)
            default_start, default_end = month_bounds(month_period(datetime.now(UTC)))
            start_field, start = range_bound(query, ("start", "start_time"), default_start)
            end_field, end = range_bound(query, ("end", "end_time"), default_end)
            if end <= start:
                raise InvalidValue(f"`{end_field}` must be after `{start_field}`.", end_field)
            group_by = query.get("group_by")
            if any(value not in ("day", "model") for value in query.getlist("group_by")):
                raise InvalidValue("`group_by` must be `day` or `model`.", "group_by")
            return await accounts.usage(record, start, end, group_by)

        return await keyed(request, answer)

    @app.get("/v1/usage/summary", **openapi.USAGE_SUMMARY)
    async def usage_summary(request: Request) -> Response:
        async def answer(record: KeyRecord) -> Any:
            return await accounts.summary(record)

        return await keyed(request, answer)

    return app


def finish_app(app: FastAPI, accounts: Accounts, max_body_bytes: int) -> FastAPI:
    add_admin_routes(app, accounts, max_body_bytes)
    app.include_router(dashboard_router())
    app.add_middleware(TracingMiddleware)
    return app
