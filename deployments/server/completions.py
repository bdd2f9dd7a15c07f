"""POST /v1/completions: vLLM's completions handler (prompts as text or token ids, batches of them)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from deployments.openai import openapi
from deployments.server.serving import serve

router = APIRouter()


@router.post("/v1/completions", **openapi.COMPLETIONS)
async def create_completion(request: Request) -> Response:
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    state = request.app.state
    return await serve(
        request, "completions", CompletionRequest, state.openai_serving_completion.create_completion, state.served_model
    )
