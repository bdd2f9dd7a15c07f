"""Load on the billing actor alone: senders hand batches of usage reports (the ingress outbox's own ``UsageReport``)
to the real ``Billing`` deployment's ``record`` through a deployment handle, as ingress replicas do.

It owns the synthetic reports and the check that the ledger holds each acknowledged event once (replays included);
it never writes the database itself.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from deployments.billing.ledger import Ledger, UsageEvent
from deployments.contracts import UsageReport
from deployments.request_ids import new_request_id

# One chat request's usage: a prompt of 100 tokens of which half were cached, 16 tokens of output.
PROMPT_TOKENS, CACHED_TOKENS, COMPLETION_TOKENS = 100, 50, 16


def usage_report(tenant: str, key_id: str, model: str) -> UsageReport:
    # Started now: the billing actor prices an event at its start, and set the model's price when it started itself.
    now = datetime.now(UTC)
    event = UsageEvent(
        request_id=f"chatcmpl-{new_request_id()}",  # as the door makes them
        tenant=tenant,
        key_id=key_id,
        model=model,
        prompt_tokens=PROMPT_TOKENS,
        cached_tokens=CACHED_TOKENS,
        completion_tokens=COMPLETION_TOKENS,
        started_at=now,
        finished_at=now,
        status="ok",
    )
    return UsageReport(event)


@dataclass
class BillingRun:
    database: str
    batch_size: int
    senders: int
    tenant: str
    seconds: float = 0.0
    acked: int = 0
    not_acked: int = 0  # ids sent in a batch but missing from its acknowledgement
    call_ms: list[float] = field(default_factory=list)
    ledger_events: int = -1  # rows of the tenant in the ledger after the run
    replay_added: int = -1  # rows a replay of an acknowledged batch added (must be 0)

    @property
    def events_per_s(self) -> float:
        return self.acked / self.seconds if self.seconds > 0 else 0.0

    @property
    def recorded_once(self) -> bool:
        return self.not_acked == 0 and self.acked > 0 and self.ledger_events == self.acked and self.replay_added == 0

    def call_ms_median(self) -> float:
        ordered = sorted(self.call_ms)
        return ordered[len(ordered) // 2] if ordered else float("nan")


async def drive_billing(
    handle: Any,
    database: str,
    tenant: str,
    key_id: str,
    model: str,
    *,
    batch_size: int,
    senders: int,
    duration_s: float,
) -> tuple[BillingRun, list[UsageReport]]:
    """``senders`` loops, each sending its next batch once the last is acknowledged, for ``duration_s``. Returns
    the run and one acknowledged batch to replay."""
    run = BillingRun(database, batch_size, senders, tenant)
    replayable: list[UsageReport] = []
    deadline = time.monotonic() + duration_s

    async def sender() -> None:
        while time.monotonic() < deadline:
            batch = [usage_report(tenant, key_id, model) for _ in range(batch_size)]
            sent = time.monotonic()
            acked = set(await handle.record.remote(batch))
            run.call_ms.append((time.monotonic() - sent) * 1000)
            run.acked += sum(1 for r in batch if r.event.request_id in acked)
            run.not_acked += sum(1 for r in batch if r.event.request_id not in acked)
            if not replayable:
                replayable.extend(batch)

    started = time.monotonic()
    await asyncio.gather(*(sender() for _ in range(senders)))
    run.seconds = time.monotonic() - started
    return run, replayable


async def check_recorded_once(handle: Any, ledger: Ledger, run: BillingRun, replay: list[UsageReport]) -> None:
    """Counts the tenant's ledger rows, replays an acknowledged batch (as an outbox does after a lost
    acknowledgement) and counts again: every acknowledged event must be there exactly once."""
    start, end = datetime.now(UTC) - timedelta(days=1), datetime.now(UTC) + timedelta(days=1)
    run.ledger_events = ledger.totals(run.tenant, start, end).requests
    acked = set(await handle.record.remote(replay))
    if acked != {r.event.request_id for r in replay}:
        run.replay_added = -1
        return
    run.replay_added = ledger.totals(run.tenant, start, end).requests - run.ledger_events
