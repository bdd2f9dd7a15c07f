"""The engine replica's door, around vLLM's serving layer: who calls (an API key, checked against the billing
actor's cache), whether they may (the key's role and model allow-list), admission at the meter (rate limits and
budget, with the prompt tokens vLLM counted, from the key's leases on this replica), the rate-limit headers, the
organisation's own prefix cache (vLLM's ``cache_salt``), the engine's deadlines (``metering.Deadlines``), and each
admitted request's usage into the usage outbox, once, however it ends.

Counts and ids only: it reads the ``Authorization`` header and the path, never the body.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from opentelemetry import trace
from opentelemetry.trace import SpanKind
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.billing.governance import authorize_call
from deployments.billing.ledger import CANCELLED, COMPLETED, ENGINE_FAILED, FAILED, UsageEvent
from deployments.contracts import Admission, AdmissionRequest, UsageReport
from deployments.errors import AnkerError
from deployments.keys import KeyRecord
from deployments.openai.accounts import authenticate
from deployments.openai.errors import error_response
from deployments.request_ids import new_request_id
from deployments.server.metering import Deadlines, Metered, RequestMeter, metering
from deployments.server.salt import cache_salt
from deployments.server.vllm_start import SERVE_LOGGER
from observability import tracing

logger = logging.getLogger(SERVE_LOGGER)  # the replica's log file

# The billing id's prefix by endpoint, as OpenAI's ids have (``chatcmpl-…``).
PREFIXES = {"/v1/chat/completions": "chatcmpl", "/v1/completions": "cmpl", "/v1/responses": "resp"}
REGION_HEADER = b"x-anker-processing-region"  # where the call was processed, on every answer to one
# How often a stream's progress is noted while it is delivered: what a replica that dies mid-stream leaves unbilled
# of each of its streams is at most what the stream was sent in this long (SECURITY.md).
PROGRESS_INTERVAL_S = 0.25


class ReplicaBilling(Protocol):
    """The billing actor as the replica's door sees it (``deployments.billing.client.ServeBillingClient``)."""

    async def verify(self, key: str) -> KeyRecord | None: ...

    async def admit(self, key: KeyRecord, request: AdmissionRequest) -> Admission: ...

    async def rate_limit_headers(self, key: KeyRecord) -> dict[str, str]: ...

    def submit(self, report: UsageReport, admission: Admission | None = None) -> None: ...

    def progress(self, report: UsageReport) -> None: ...


@dataclass
class Call:
    """One admitted-or-not call of the model: the caller's key and the id billing uses, made here and never taken
    from the client, so no client can make two requests share one ledger row."""

    key: KeyRecord
    billing_id: str
    path: str  # below the application's route prefix: ``/v1/chat/completions``, …
    request_id: str = ""  # the HTTP request's id (``X-Request-Id``, as HAProxy and Serve name it), if it is one
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    admission: Admission | None = None
    limit_headers: dict[str, str] = field(default_factory=dict)  # sent with the response, refused or not
    status: int = 0  # the response's, once it has started
    progress_at: float | None = None  # when the stream's progress was last noted (time.monotonic())


def route(scope: Scope) -> str:
    """The request's path below the application's route prefix (Serve passes that prefix as ``root_path``)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _status(call: Call, metered: Metered) -> str:
    """How the request ended, for the ledger (``ledger.charge`` bills by it)."""
    if metered.finished:
        return COMPLETED
    if call.status >= 500:  # answered with an error: nothing was delivered
        return FAILED
    return ENGINE_FAILED if metered.engine_failed else CANCELLED  # cut off mid-stream: what it got is billed


class KeyGate:
    """ASGI middleware: every ``/v1/`` request needs a valid key; a call of the model (a POST) is authorized,
    admitted at the meter, held to the engine's ``deadlines`` there and billed once. ``report`` gets each call's
    counts too (metrics, tests)."""

    def __init__(
        self,
        app: ASGIApp,
        billing: ReplicaBilling,
        model: str,
        region: str,
        report: Callable[[Call, Metered], None] = lambda call, metered: None,
        *,
        deadlines: Deadlines,
        log_requests: bool = False,
    ) -> None:
        self.app = app
        self.log_requests = log_requests
        self.billing = billing
        self.model = model
        self.region = region
        self.report = report
        self.deadlines = deadlines

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route(scope) if scope["type"] == "http" else ""
        if not path.startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        try:
            key = await authenticate(HTTPConnection(scope), self.billing.verify)
            if scope["method"] == "POST":
                authorize_call(key, self.model, self.region)
        except AnkerError as error:
            await error_response(error)(scope, receive, send)
            return
        if scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        own_id = new_request_id()
        call = Call(key, f"{PREFIXES.get(path, 'req')}-{own_id}", path, tracing.request_id(scope))
        # vLLM makes the engine's request id and the answer's ``id`` from ``X-Request-Id``: the client's own is for
        # correlation only (kept above, if shaped like an id), so vLLM gets the door's, and the answer's id is the
        # ledger's billing id (``chatcmpl-…``, ``cmpl-…``).
        # In place, not a copy: the middlewares outside read what the app writes into the scope (its route).
        headers = [(k, v) for k, v in scope.get("headers", ()) if k.lower() != b"x-request-id"]
        scope["headers"] = [*headers, (b"x-request-id", own_id.encode())]

        async def admit(prompt_tokens: int, max_output_tokens: int) -> None:
            with tracing.span("admission", kind=SpanKind.CLIENT, attrs={"anker.billing_id": call.billing_id}):
                request = AdmissionRequest(
                    call.billing_id,
                    key.key_id,
                    key.tenant,
                    self.model,
                    prompt_tokens,
                    max_output_tokens,
                    trace=tracing.inject(),  # billing's span joins the request's trace
                )
                try:
                    call.admission = await self.billing.admit(key, request)
                except AnkerError:  # refused: the client still learns where its limits stand
                    with contextlib.suppress(AnkerError):
                        call.limit_headers = await self.billing.rate_limit_headers(key)
                    raise
            call.limit_headers = call.admission.rate_limit_headers

        async def send_with_limits(message: Message) -> None:
            if message["type"] == "http.response.start":
                call.status = message["status"]
                if not call.limit_headers:  # turned away before admission (a mistake in the body, say)
                    with contextlib.suppress(AnkerError):  # billing is away: the answer goes out without them
                        call.limit_headers = await self.billing.rate_limit_headers(key)
                added = [(k.lower().encode(), v.encode()) for k, v in call.limit_headers.items()]
                added.append((REGION_HEADER, self.region.encode()))
                message = {**message, "headers": [*message.get("headers", ()), *added]}
            await send(message)
            if message["type"] == "http.response.body" and message.get("more_body") and call.admission is not None:
                self._delivered(call, meter)

        # Each organisation its own prefix cache: no tenant's prompt can be timed against another's.
        with metering(
            lambda metered: self._metered(call, metered), admit, cache_salt(key.tenant), self.deadlines
        ) as meter:
            await self.app(scope, receive, send_with_limits)

    def _delivered(self, call: Call, meter: RequestMeter) -> None:
        """A stream's chunk has gone to its client: its progress is noted, the first chunk's at once and then at
        most every ``PROGRESS_INTERVAL_S``, so a replica that dies mid-stream leaves its usage up to there behind
        (``usage_outbox``). The counts are the engine outputs the chunks sent so far were made from."""
        now = time.monotonic()
        if call.progress_at is not None and now - call.progress_at < PROGRESS_INTERVAL_S:
            return
        call.progress_at = now
        prompt, cached, output = meter.so_far()
        event = self._event(call, prompt, cached, output, ENGINE_FAILED)
        self.billing.progress(UsageReport(event, call.admission.lease_id if call.admission else None))

    def _event(self, call: Call, prompt: int, cached: int, output: int, status: str) -> UsageEvent:
        return UsageEvent(
            request_id=call.billing_id,
            tenant=call.key.tenant,
            key_id=call.key.key_id,
            model=self.model,
            prompt_tokens=prompt,
            cached_tokens=cached,
            completion_tokens=output,
            started_at=call.started_at,
            finished_at=datetime.now(UTC),
            status=status,
        )

    def _metered(self, call: Call, metered: Metered) -> None:
        # The request's server span (the door runs inside it, and it ends once the door has returned) carries what
        # the request made the engine do: counts only.
        tracing.set_attributes(
            trace.get_current_span(),
            {
                "anker.prompt_tokens": metered.prompt_tokens,
                "anker.cached_tokens": metered.cached_tokens,
                "anker.completion_tokens": metered.output_tokens,
            },
        )
        if metered.admitted and call.admission is not None:
            event = self._event(
                call, metered.prompt_tokens, metered.cached_tokens, metered.output_tokens, _status(call, metered)
            )
            self.billing.submit(UsageReport(event, call.admission.lease_id), call.admission)
            if self.log_requests:  # counts and ids only: this line is what zero data retention allows to be kept
                logger.info(
                    "usage request_id=%s billing_id=%s model=%s status=%s prompt_tokens=%d cached_tokens=%d "
                    "completion_tokens=%d",
                    call.request_id or "-",
                    call.billing_id,
                    self.model,
                    event.status,
                    event.prompt_tokens,
                    event.cached_tokens,
                    event.completion_tokens,
                )
        self.report(call, metered)
