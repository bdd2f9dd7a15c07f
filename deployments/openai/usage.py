"""What a request is billed for: its context, and the tracker that sends its usage report exactly once.

However a request ends (finished, failed, refused by the engine, cut off by the client), the serving code calls
``UsageTracker.finish`` in a ``finally``; the report goes to billing (``BillingGate.submit``), its counts onto the
request's span and a log line of counts and ids only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from opentelemetry import trace

from deployments.billing.ledger import UsageEvent
from deployments.billing.service import UsageReport
from deployments.contracts import Admission, AdmissionRequest
from deployments.errors import AnkerError
from deployments.keys import KeyRecord
from deployments.openai import responses as wire
from observability import metrics, tracing

logger = logging.getLogger("ray.serve")


class BillingGate(Protocol):
    """Billing as the request path sees it: admission before the engine, a usage report after."""

    async def admit(self, key: KeyRecord, request: AdmissionRequest) -> Admission: ...

    def submit(self, report: UsageReport) -> None: ...


@dataclass
class RequestContext:
    """One HTTP request: the caller's key, the id clients see, the id billing uses, and headers to send back.

    ``billing_id`` is made here and never taken from the client, so no client can make two requests share one
    ledger row (the ledger is idempotent on it).
    """

    key: KeyRecord
    request_id: str
    billing_id: str
    headers: dict[str, str] = field(default_factory=dict)
    model: str | None = None  # a served model's name once the request names one (a bounded metric label)
    started_s: float = field(default_factory=time.monotonic)
    first_token_s: float | None = None


class UsageTracker:
    """Sends one usage report for an admitted request, however it ends; later calls do nothing."""

    def __init__(
        self, gate: BillingGate, ctx: RequestContext, model: str, acc: wire.Accumulator, admission: Admission
    ) -> None:
        self._gate = gate
        self._ctx = ctx
        self._model = model
        self._acc = acc
        self._admission = admission
        self._started_at = datetime.now(UTC)
        self._done = False

    def finish(self, status: str) -> None:
        if self._done:
            return
        self._done = True
        usage = self._acc.usage
        event = UsageEvent(
            request_id=self._ctx.billing_id,
            tenant=self._ctx.key.tenant,
            key_id=self._ctx.key.key_id,
            model=self._model,
            prompt_tokens=usage.prompt_tokens,
            cached_tokens=usage.cached_tokens,
            completion_tokens=usage.completion_tokens,
            started_at=self._started_at,
            finished_at=datetime.now(UTC),
            status=status,
        )
        counts = {
            "anker.prompt_tokens": usage.prompt_tokens,
            "anker.cached_tokens": usage.cached_tokens,
            "anker.completion_tokens": usage.completion_tokens,
            "anker.status": status,
        }
        tracing.set_attributes(trace.get_current_span(), counts)  # on the request's own span
        if self._ctx.first_token_s is not None:
            metrics.first_token(self._model, self._ctx.first_token_s - self._ctx.started_s)
            if usage.completion_tokens > 1:
                per_token = (time.monotonic() - self._ctx.first_token_s) / (usage.completion_tokens - 1)
                metrics.inter_token(self._model, per_token)
        with tracing.span("billing.usage_report", attrs={"anker.billing_id": self._ctx.billing_id, **counts}):
            self._gate.submit(UsageReport(event, self._admission.reserved_tokens))
        _log_usage(self._ctx.request_id, self._model, usage, status)


def status_of(error: BaseException) -> str:
    if isinstance(error, AnkerError):
        return error.code or "error"
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        return "cancelled"
    return "error"


def _log_usage(request_id: str, model: str, usage: wire.Usage, status: str) -> None:
    # Counts and ids only: this line is what zero data retention allows to be kept.
    logger.info(
        "usage request_id=%s model=%s status=%s prompt_tokens=%d cached_tokens=%d completion_tokens=%d",
        request_id,
        model,
        status,
        usage.prompt_tokens,
        usage.cached_tokens,
        usage.completion_tokens,
    )
