"""The engine replica's HTTP app: vLLM's serving layer behind Anker's endpoints. What wraps it meters every
request: ``KeyGate`` (``gate.py``: keys, admission, billing) in a replica, or ``MeteringMiddleware`` alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from deployments.server import chat, completions, models, responses
from deployments.server.metering import Metered, metering


class MeteringMiddleware:
    """Meters each HTTP request as a whole (its streamed body included) and reports it once, however it ends."""

    def __init__(self, app: ASGIApp, report: Callable[[Scope, Metered], None]) -> None:
        self.app = app
        self.report = report

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with metering(lambda metered: self.report(scope, metered)):
            await self.app(scope, receive, send)


def create_server_app(
    vllm_state: Any,
    served_model: str,
    model_cards: list[dict[str, Any]],
    max_body_bytes: int = 4 * 1024 * 1024,
) -> FastAPI:
    """``vllm_state``: the serving objects of ``VllmLayer``; ``model_cards``: ``/v1/models``' entries;
    ``max_body_bytes``: the config's ``server.max_request_bytes``."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app.state._state.update(vllm_state._state)
    app.state.served_model = served_model
    app.state.model_cards = tuple(model_cards)
    app.state.max_body_bytes = max_body_bytes
    config = getattr(vllm_state, "vllm_config", None)
    app.state.reads_images = config is not None and config.model_config.is_multimodal_model
    for endpoint in (chat, completions, responses, models):
        app.include_router(endpoint.router)
    app.include_router(responses.stored)
    return app
