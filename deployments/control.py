"""The control application: what the one base URL answers that no model's replica does.

Each model is a Serve application of its own at ``/models/<model>`` (its engine replica the ingress); HAProxy sends
a request to it by the model its body names (``deployments/server/haproxy.py``). Everything else comes here, to
the application at ``/``: the model list, ``/healthz``, usage, administration and the dashboard, a request for a
model that is not served (404 ``model_not_found``) or one whose application is not up yet (503, with Retry-After),
and what is asked of a stored response (nothing is stored). It holds the billing actor, which the model
applications reach by its application and deployment name (``BILLING_DEPLOYMENT`` in ``APP_NAME``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.responses import Response

from deployments.billing.client import ServeBillingClient
from deployments.billing.governance import authorize_call
from deployments.drain import CONTROL_DEPLOYMENT, DrainGate, watch_drain
from deployments.errors import AnkerError, EngineUnavailable, RouteNotFound
from deployments.keys import KeyRecord
from deployments.openai.accounts import Accounts
from deployments.openai.accounts import authenticate as authenticate_with
from deployments.openai.catalog import ModelCatalog, ServedModel
from deployments.openai.control_app import accounts_app, finish_app
from deployments.openai.errors import error_response
from deployments.readiness import ReadinessWatch
from deployments.server import responses
from deployments.server.observed import RequestMetrics
from deployments.server.requests import checked_body, read_body
from observability import metrics, tracing

# The endpoints a model's replica serves, by the path HAProxy sends on when the body names no served model.
MODEL_ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/responses": "responses"}
RETRY_AFTER_S = 5  # how soon a client may try a model whose application is starting


@dataclass(frozen=True)
class ModelApp:
    """A model's own Serve application: its name, its ingress deployment and its route prefix."""

    model: str
    app: str
    deployment: str
    route_prefix: str


@dataclass(frozen=True)
class ControlSpec:
    models: tuple[ServedModel, ...]
    apps: tuple[ModelApp, ...]
    max_body_bytes: int
    key_cache_ttl_s: float = 10.0
    usage_flush_interval_s: float = 0.2


class AppsCatalog(ModelCatalog):
    """The served models, with whether each one's application answers (``readiness``: by model name)."""

    def __init__(self, models: tuple[ServedModel, ...], readiness: Callable[[], dict[str, bool]]) -> None:
        super().__init__(models)
        self.readiness = readiness


def create_control_app(
    catalog: AppsCatalog, accounts: Accounts, max_body_bytes: int, prefixes: dict[str, str]
) -> FastAPI:
    """``prefixes``: each model's route prefix, by model name."""
    app = accounts_app(catalog, accounts)
    by_prefix = {prefix: model for model, prefix in prefixes.items()}

    async def key(request: Request) -> KeyRecord:
        return await authenticate_with(request, accounts.verify)

    def starting(model: str) -> AnkerError:
        message = f"The model `{model}` is starting up or restarting. Please retry shortly."
        return EngineUnavailable(message, retry_after_s=RETRY_AFTER_S)

    @app.post("/v1/chat/completions", include_in_schema=False)
    @app.post("/v1/completions", include_in_schema=False)
    @app.post("/v1/responses", include_in_schema=False)
    async def undispatched(request: Request) -> Response:
        # HAProxy sends a request here when its body names no model it serves. Checked as a replica checks it, so
        # that a client's mistake gets the same answer wherever it lands.
        record = await key(request)
        body = checked_body(await read_body(request, max_body_bytes), MODEL_ENDPOINTS[request.url.path])
        model = body.get("model")
        served = catalog.model(model if isinstance(model, str) else "")
        authorize_call(record, served.name, served.region)  # as the replica would: the key's role and allow-list
        # A served model comes here only while its application is not up (or without HAProxy's dispatch).
        return error_response(starting(served.name))

    @app.api_route("/models/{prefix}/{rest:path}", methods=["GET", "POST", "DELETE"], include_in_schema=False)
    async def model_app_down(prefix: str, request: Request) -> Response:
        # HAProxy put the model's prefix on the path, but Serve has no application there yet: it is deploying.
        record = await key(request)
        model = by_prefix.get(f"/models/{prefix}")
        if model is None:
            return error_response(RouteNotFound(f"Unknown request URL: {request.method} {request.url.path}."))
        if request.method == "POST":  # a call of the model: the key's role and allow-list, as the replica checks
            served = catalog.model(model)
            authorize_call(record, served.name, served.region)
        return error_response(starting(model))

    app.include_router(responses.stored, dependencies=[Depends(key)])
    return finish_app(app, accounts, max_body_bytes)


@serve.deployment(name=CONTROL_DEPLOYMENT, health_check_period_s=5)
@serve.ingress()
class ControlServer:
    def __init__(self, spec: ControlSpec, billing: DeploymentHandle) -> None:
        tracing.configure("anker-control")
        self._spec = spec
        self._billing = ServeBillingClient(billing, spec.key_cache_ttl_s, spec.usage_flush_interval_s, None)
        self._watches = {a.model: ReadinessWatch(serve.get_deployment_handle(a.deployment, a.app)) for a in spec.apps}
        self._tasks: list[asyncio.Task[None]] = []

    def __serve_build_asgi_app__(self) -> Any:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(watch.watch()) for watch in self._watches.values()]
        watches = self._watches
        catalog = AppsCatalog(self._spec.models, lambda: {model: watch.ready for model, watch in watches.items()})
        prefixes = {a.model: a.route_prefix for a in self._spec.apps}
        app = create_control_app(catalog, self._billing, self._spec.max_body_bytes, prefixes)
        # A call of a model that lands here reached no model, and is measured so.
        gate = DrainGate(RequestMetrics(app, metrics.NO_MODEL))
        context = serve.get_replica_context()
        replica = context.replica_id.to_full_id_str()
        self._tasks.append(loop.create_task(watch_drain(gate, context.app_name, replica, lambda: 0)))
        return gate
