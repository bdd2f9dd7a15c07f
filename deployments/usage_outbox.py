"""The ingress's usage outbox: every finished request's usage report waits here until the billing actor has
acknowledged it (the ledger committed it), and is re-sent until then: at-least-once delivery.

Reports are keyed by billing id, so a report never leaves twice in one batch and a replay is harmless (the ledger
ignores ids it has). It holds counts and ids only. It must never drop a report to make room.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence

from deployments.billing.service import UsageReport

logger = logging.getLogger("ray.serve")

Send = Callable[[Sequence[UsageReport]], Awaitable[Sequence[str]]]


class UsageOutbox:
    def __init__(
        self, send: Send, flush_interval_s: float = 0.2, max_batch: int = 256, max_backoff_s: float = 5.0
    ) -> None:
        self._send = send
        self._flush_interval_s = flush_interval_s
        self._max_batch = max_batch
        self._max_backoff_s = max_backoff_s
        self._pending: dict[str, UsageReport] = {}
        self._wake = asyncio.Event()
        self.sent_batches = 0
        self.failed_sends = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def submit(self, report: UsageReport) -> None:
        """Queues a report; never blocks and never fails, so the request path can always call it."""
        self._pending[report.event.request_id] = report
        if len(self._pending) >= self._max_batch:
            self._wake.set()

    async def flush_once(self) -> int:
        """Sends one batch; returns how many were acknowledged. Raises what the send raised (the batch stays)."""
        if not self._pending:
            return 0
        batch = list(self._pending.values())[: self._max_batch]
        acked = await self._send(batch)
        self.sent_batches += 1
        for billing_id in acked:
            self._pending.pop(billing_id, None)
        return len(acked)

    async def run(self) -> None:
        """Flushes forever: every interval, at once when a batch is full, backing off while billing is away."""
        backoff_s = self._flush_interval_s
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), backoff_s)
            self._wake.clear()
            try:
                while self._pending and await self.flush_once():
                    pass
                backoff_s = self._flush_interval_s
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failed_sends += 1
                backoff_s = min(self._max_backoff_s, max(backoff_s * 2, 0.5))
                logger.warning(
                    "usage outbox: billing unreachable (%s); %d reports kept, retry in %.1fs",
                    type(exc).__name__,
                    len(self._pending),
                    backoff_s,
                )

    async def drain(self, timeout_s: float) -> bool:
        """Tries to deliver everything before the ingress stops; True if nothing is left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._pending and loop.time() < deadline:
            try:
                await asyncio.wait_for(self.flush_once(), max(0.1, deadline - loop.time()))
            except Exception:
                await asyncio.sleep(0.2)
        return not self._pending
