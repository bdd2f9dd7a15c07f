"""POST /v1/chat/completions: vLLM's chat handler, with tools, reasoning and structured outputs."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from deployments.openai import openapi
from deployments.server.serving import serve

router = APIRouter()


@router.post("/v1/chat/completions", **openapi.CHAT_COMPLETIONS)
async def create_chat_completion(request: Request) -> Response:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    state = request.app.state
    return await serve(
        request, "chat", ChatCompletionRequest, state.openai_serving_chat.create_chat_completion, state.served_model
    )
