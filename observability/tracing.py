"""Tracing with OpenTelemetry: one trace per request, across the deployments, carried by W3C trace context.

Each process configures its tracer provider once from the standard ``OTEL_*`` variables (``OTEL_TRACES_EXPORTER``
otlp | console | none, ``OTEL_EXPORTER_OTLP_*``, ``OTEL_TRACES_SAMPLER[_ARG]``). Calls between deployments carry a
small carrier dict (``traceparent``), since a Ray handle call does not carry the caller's context. Span attributes are
ids, model names, counts and statuses: never prompt or completion text (``checked`` refuses anything else).
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

TRACER_NAME = "anker"
Carrier = dict[str, str]

# Attribute keys a span may carry; a value must be a number, a bool or a short id/name. Nothing else gets through.
ALLOWED_ATTRIBUTES = frozenset(
    {
        "anker.request_id",
        "anker.billing_id",
        "anker.model",
        "anker.tenant",
        "anker.key_id",
        "anker.status",
        "anker.stream",
        "anker.n",
        "anker.prompt_tokens",
        "anker.cached_tokens",
        "anker.completion_tokens",
        "anker.max_tokens",
        "anker.engine_deployment",
        "anker.engine_replica",
        "anker.budget_reserved",
        "anker.error_code",
        "http.request.method",
        "http.response.status_code",
        "url.path",
    }
)
_MAX_TEXT = 128

_configured = False
_lock = threading.Lock()


def configure(service_name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Installs this process's tracer provider from ``OTEL_*`` (once); False when tracing is off (the default)."""
    global _configured
    env = os.environ if environ is None else environ
    exporter_name = env.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
    with _lock:
        if _configured:
            return True
        if exporter_name in ("", "none"):
            return False
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

        exporter: SpanExporter
        if exporter_name == "console":
            exporter = ConsoleSpanExporter()
        elif exporter_name == "otlp":
            protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"))
            if protocol.startswith("http"):
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

                exporter = HttpExporter()
            else:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

                exporter = GrpcExporter()
        else:
            raise ValueError(f"OTEL_TRACES_EXPORTER={exporter_name}: Anker supports otlp, console or none")
        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))  # sampler: OTEL_*
        provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        _configured = True
        return True


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def checked(values: Mapping[str, Any] | None) -> dict[str, Any]:
    """Span attributes, checked: only keys on the allow-list, and only numbers, bools and short strings (ids, names,
    codes). None values are dropped. Anything else is a programming error, raised at once."""
    out: dict[str, Any] = {}
    for key, value in (values or {}).items():
        if key not in ALLOWED_ATTRIBUTES:
            raise ValueError(f"span attribute {key} is not on the allow-list")
        if value is None:
            continue
        if isinstance(value, str) and len(value) > _MAX_TEXT:
            raise ValueError(f"span attribute {key} is too long for an id or a name")
        if not isinstance(value, (str, bool, int, float)):
            raise ValueError(f"span attribute {key} must be a number, a bool or a short string")
        out[key] = value
    return out


def inject() -> Carrier:
    """The current trace context as a carrier for a handle call (empty when nothing is traced)."""
    carrier: Carrier = {}
    propagate.inject(carrier)
    return carrier


def extract(carrier: Mapping[str, str] | None) -> otel_context.Context:
    return propagate.extract(dict(carrier or {}))


@contextmanager
def span(
    name: str,
    carrier: Mapping[str, str] | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
    attrs: Mapping[str, Any] | None = None,
) -> Iterator[Span]:
    """A span, child of ``carrier``'s context if given (the other side of a handle call), else of the current one.

    An exception ends it with status ERROR and the exception's type (and Anker error code), never its message; a
    cancellation (the client went away) is marked ``anker.status=cancelled``.
    """
    parent = extract(carrier) if carrier is not None else None
    with tracer().start_as_current_span(
        name,
        context=parent,
        kind=kind,
        attributes=checked(attrs),
        record_exception=False,
        set_status_on_exception=False,
    ) as current:
        try:
            yield current
        except (asyncio.CancelledError, GeneratorExit):
            current.set_attribute("anker.status", "cancelled")
            raise
        except BaseException as error:
            failed(current, error)
            raise


def failed(current: Span, error: BaseException) -> None:
    """Marks ``current`` as ended by ``error``: status ERROR with the error's type (and its Anker error code), never
    its message. For an error a span's code returns rather than raises (a refusal the billing actor hands back)."""
    code = getattr(error, "code", None)
    current.set_status(Status(StatusCode.ERROR, type(error).__name__))
    if isinstance(code, str):
        current.set_attribute("anker.error_code", code)


def set_attributes(target: Span, attrs: Mapping[str, Any]) -> None:
    target.set_attributes(checked(attrs))


_REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


def request_id(scope: Mapping[str, Any]) -> str:
    """The HTTP request's ``X-Request-Id`` (HAProxy or Serve sets it, or the client sent one), if it is shaped like
    an id: a header a client wrote may be text, and then it is not kept."""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"x-request-id":
            text = value.decode("latin-1")
            return text if _REQUEST_ID.match(text) else ""
    return ""


class TracingMiddleware:
    """ASGI middleware: one SERVER span per HTTP request, child of an incoming ``traceparent`` if there is one, kept
    open until the app has returned (after the last body chunk of a streamed response, and after what the app does
    once the response is sent, such as metering the request). Names the span by the route template;
    ``attributes`` (ids and names of the server itself, checked as every attribute is) go on each span."""

    def __init__(self, app: Any, attributes: Mapping[str, Any] | None = None) -> None:
        self.app = app
        self.attributes = checked(attributes)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
        method = scope.get("method", "GET")
        current = tracer().start_span(
            f"{method} {scope.get('path', '')}",
            context=extract(headers),
            kind=SpanKind.SERVER,
            attributes={
                **self.attributes,
                **checked({"http.request.method": method, "anker.request_id": request_id(scope) or None}),
            },
        )
        token = otel_context.attach(trace.set_span_in_context(current))

        async def traced_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status = int(message["status"])
                current.set_attribute("http.response.status_code", status)
                if status >= 500:
                    current.set_status(Status(StatusCode.ERROR))
            await send(message)

        try:
            await self.app(scope, receive, traced_send)
        except BaseException as error:
            current.set_status(Status(StatusCode.ERROR, type(error).__name__))
            raise
        finally:
            template = getattr(scope.get("route"), "path", None)
            current.update_name(f"{method} {template or 'unmatched'}")
            current.set_attribute("url.path", template or "unmatched")  # templates only: no ids in paths
            current.end()
            otel_context.detach(token)
