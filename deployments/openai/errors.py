"""The one place where Anker's error values become OpenAI's wire shape and HTTP status.

``{"error": {"message", "type", "param", "code"}}``, with ``Retry-After`` on 429/503. The message is the error's own
text, which by construction names fields and counts but never quotes request content.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from deployments.errors import AnkerError, RetryLater


def error_body(error: AnkerError) -> dict[str, Any]:
    return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}


def error_headers(error: AnkerError) -> dict[str, str]:
    if isinstance(error, RetryLater):
        return {"Retry-After": str(error.retry_after_s)}
    if error.status in (429, 503):
        return {"Retry-After": "60" if error.status == 429 else "1"}
    return {}


def error_response(error: AnkerError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        error_body(error), status_code=error.status, headers={**error_headers(error), **(headers or {})}
    )
