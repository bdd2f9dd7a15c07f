"""POST /v1/responses: vLLM's Responses handler, with nothing stored (zero data retention). A stored response
cannot be fetched, continued or cancelled: those routes answer 404 and say why."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from deployments.errors import NotFound
from deployments.openai import openapi
from deployments.openai.errors import error_response
from deployments.server.requests import NO_STORAGE
from deployments.server.serving import serve

router = APIRouter()
# What is asked of a stored response: the same answer from a replica and from the control application, which gets
# every request that names no model (deployments/control.py).
stored = APIRouter()


@router.post("/v1/responses", **openapi.RESPONSES)
async def create_response(request: Request) -> Response:
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest

    state = request.app.state
    return await serve(
        request, "responses", ResponsesRequest, state.openai_serving_responses.create_responses, state.served_model
    )


@stored.get("/v1/responses/{response_id}")
@stored.delete("/v1/responses/{response_id}")
@stored.post("/v1/responses/{response_id}/cancel")
async def stored_response(response_id: str) -> Response:
    return error_response(NotFound(NO_STORAGE, "response_id"))
