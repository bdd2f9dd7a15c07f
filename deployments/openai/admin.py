"""``/admin``: the operator (admin token) manages every organisation; an owner's or admin's key manages its own.

Every operation is the billing actor's (``Accounts.administer``), which checks who may do what and records the change
in the audit trail; these routes only find out who calls and which fields they send, in that order: who calls is a
dependency of the whole router, so no body is read, let alone parsed, for a caller who is not known.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from starlette.responses import JSONResponse, Response

from deployments.billing.governance import BUDGET_SETTINGS, OPERATOR_SETTINGS, Actor
from deployments.errors import InvalidApiKey, InvalidJson, InvalidRequest, InvalidValue
from deployments.openai.accounts import BAD_KEY, Accounts, bearer
from deployments.server.requests import read_body

ADMIN_NO_TOKEN = "Administration needs the operator's admin token or an owner's or admin's API key (Bearer auth)."


def add_admin_routes(app: FastAPI, accounts: Accounts, max_body_bytes: int) -> None:
    """``/admin``: the operator (admin token) manages every organisation; an owner or admin key manages its own."""

    async def caller(request: Request) -> None:
        """Who calls, in the request's state; FastAPI resolves it before a route runs."""
        request.state.actor = await actor(request)

    async def actor(request: Request) -> Actor:
        token = bearer(request)
        if token is None:
            raise InvalidApiKey(ADMIN_NO_TOKEN)
        if await accounts.is_admin_token(token):
            return Actor.operator("admin-token")
        record = await accounts.verify(token)
        if record is None:
            raise InvalidApiKey(BAD_KEY)
        return Actor.of_key(record)

    async def body_of(request: Request) -> dict[str, Any]:
        raw = await read_body(request, max_body_bytes)
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested past the parser's depth
            raise InvalidJson("The request body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise InvalidRequest("The request body must be a JSON object.")
        return body

    def only(body: dict[str, Any], allowed: set[str]) -> dict[str, Any]:
        unknown = set(body) - allowed
        if unknown:
            raise InvalidValue(f"Unknown field `{sorted(unknown)[0]}`.", sorted(unknown)[0])
        return body

    async def run(request: Request, operation: str, arguments: dict[str, Any], status: int = 200) -> Response:
        result = await accounts.administer(request.state.actor, operation, arguments)
        if isinstance(result, list):
            result = {"object": "list", "data": result}
        return JSONResponse(result, status_code=status)

    admin = APIRouter(prefix="/admin", dependencies=[Depends(caller)])
    tenant_fields = set(OPERATOR_SETTINGS | BUDGET_SETTINGS)  # governance says who may set which
    key_fields = {"name", "role", "member_id", "allowed_models", "budget_dkk", "rpm", "tpm"}

    @admin.get("/tenants")
    async def list_tenants(request: Request) -> Response:
        return await run(request, "list_tenants", {})

    @admin.post("/tenants")
    async def create_tenant(request: Request) -> Response:
        body = only(await body_of(request), tenant_fields | {"id"})
        tenant = body.pop("id", None)
        return await run(request, "create_tenant", {"tenant": tenant, **body}, 201)

    @admin.get("/tenants/{tenant}")
    async def get_tenant(tenant: str, request: Request) -> Response:
        return await run(request, "get_tenant", {"tenant": tenant})

    @admin.patch("/tenants/{tenant}")
    async def update_tenant(tenant: str, request: Request) -> Response:
        return await run(request, "update_tenant", {"tenant": tenant, **only(await body_of(request), tenant_fields)})

    @admin.get("/tenants/{tenant}/members")
    async def list_members(tenant: str, request: Request) -> Response:
        return await run(request, "list_members", {"tenant": tenant})

    @admin.post("/tenants/{tenant}/members")
    async def add_member(tenant: str, request: Request) -> Response:
        body = only(await body_of(request), {"name", "role"})
        return await run(
            request, "add_member", {"tenant": tenant, "name": body.get("name"), "role": body.get("role")}, 201
        )

    @admin.patch("/tenants/{tenant}/members/{member_id}")
    async def set_member_role(tenant: str, member_id: str, request: Request) -> Response:
        body = only(await body_of(request), {"role"})
        return await run(
            request, "set_member_role", {"tenant": tenant, "member_id": member_id, "role": body.get("role")}
        )

    @admin.delete("/tenants/{tenant}/members/{member_id}")
    async def remove_member(tenant: str, member_id: str, request: Request) -> Response:
        return await run(request, "remove_member", {"tenant": tenant, "member_id": member_id})

    @admin.get("/tenants/{tenant}/keys")
    async def list_keys(tenant: str, request: Request) -> Response:
        return await run(request, "list_keys", {"tenant": tenant})

    @admin.post("/tenants/{tenant}/keys")
    async def create_key(tenant: str, request: Request) -> Response:
        return await run(request, "create_key", {"tenant": tenant, **only(await body_of(request), key_fields)}, 201)

    @admin.patch("/keys/{key_id}")
    async def update_key(key_id: str, request: Request) -> Response:
        body = only(await body_of(request), key_fields - {"member_id"})
        return await run(request, "update_key", {"key_id": key_id, **body})

    @admin.delete("/keys/{key_id}")
    async def revoke_key(key_id: str, request: Request) -> Response:
        return await run(request, "revoke_key", {"key_id": key_id})

    @admin.get("/tenants/{tenant}/audit")
    async def tenant_audit(tenant: str, request: Request) -> Response:
        return await run(request, "audit_log", {"tenant": tenant})

    @admin.get("/audit")
    async def audit(request: Request) -> Response:
        return await run(request, "audit_log", {"tenant": None})

    app.include_router(admin)
