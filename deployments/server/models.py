"""GET /v1/models: every model the platform serves, not only this replica's (one base URL serves them all)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": list(request.app.state.model_cards)})
