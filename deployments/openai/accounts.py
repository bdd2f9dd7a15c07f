"""Keys as the HTTP layer sees them: the ``Accounts`` client (the billing actor, through the ingress), reading a
bearer token, and the messages of a missing or wrong key."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Protocol

from starlette.requests import HTTPConnection

from deployments.billing.governance import Actor
from deployments.errors import InvalidApiKey
from deployments.keys import KeyRecord

NO_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth "
    "(i.e. Authorization: Bearer YOUR_KEY)."
)
BAD_KEY = "Incorrect API key provided. You can create a key with `anker keys create --tenant NAME`."


class Accounts(Protocol):
    """Keys, usage and administration as the HTTP layer sees them (the billing actor, through the ingress)."""

    async def verify(self, key: str) -> KeyRecord | None: ...

    async def is_admin_token(self, token: str) -> bool: ...

    async def rate_limit_headers(self, key: KeyRecord) -> dict[str, str]: ...

    async def usage(self, key: KeyRecord, start: datetime, end: datetime, group_by: str | None) -> dict[str, Any]: ...

    async def summary(self, key: KeyRecord) -> dict[str, Any]: ...

    async def administer(self, actor: Actor, operation: str, arguments: dict[str, Any]) -> Any: ...


def bearer(request: HTTPConnection) -> str | None:
    """The bearer token of a request (Starlette's ``Request``, or ``HTTPConnection(scope)`` in ASGI middleware)."""
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def authenticate(request: HTTPConnection, verify: Callable[[str], Awaitable[KeyRecord | None]]) -> KeyRecord:
    """The caller's key record, or 401 with OpenAI's words for a missing or wrong key."""
    key = bearer(request)
    if key is None:
        raise InvalidApiKey(NO_KEY)
    record = await verify(key)
    if record is None:
        raise InvalidApiKey(BAD_KEY)
    return record
