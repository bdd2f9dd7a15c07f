"""GET /v1/models on an engine replica: its own model's card. Through the one base URL, HAProxy sends this route
to the control application, which lists every model served."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": list(request.app.state.model_cards)})
