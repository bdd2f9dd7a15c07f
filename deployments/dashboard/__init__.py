"""The customer dashboard: serves its static page (HTML, JS, CSS) from package data under ``/dashboard``.

It serves only a fixed allow-list of files, with strict security headers; it never sees keys or usage data itself.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from starlette.exceptions import HTTPException
from starlette.responses import Response

# The page loads nothing from elsewhere and nothing inline; the browser enforces that for every response.
SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'"
    ),
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

INDEX = "index.html"
CONTENT_TYPES: dict[str, str] = {
    INDEX: "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# Only these names are reachable as /dashboard/{name}; the page itself is /dashboard.
SERVED_BY_NAME = frozenset({"app.js", "style.css"})


def _read_static() -> dict[str, bytes]:
    static = resources.files(__name__).joinpath("static")
    return {name: static.joinpath(name).read_bytes() for name in CONTENT_TYPES}


def router() -> APIRouter:
    """The dashboard's routes. Files are read once here, so a missing package-data file fails at start, not per hit."""
    files = _read_static()
    routes = APIRouter(include_in_schema=False)

    def serve(name: str) -> Response:
        return Response(files[name], media_type=CONTENT_TYPES[name], headers=SECURITY_HEADERS)

    @routes.get("/dashboard")
    @routes.get("/dashboard/")
    async def index() -> Response:
        return serve(INDEX)

    # ``path`` so that every miss under /dashboard (``../x``, ``a/b``) is answered here, with the headers.
    @routes.get("/dashboard/{name:path}")
    async def static_file(name: str) -> Response:
        if name not in SERVED_BY_NAME:
            raise HTTPException(404, headers=SECURITY_HEADERS)
        return serve(name)

    return routes
