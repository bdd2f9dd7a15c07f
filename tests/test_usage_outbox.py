"""The ingress's usage outbox: at-least-once delivery with retries, and the spool that outlives a dead replica."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from deployments.billing.ledger import UsageEvent
from deployments.contracts import UsageReport
from deployments.usage_outbox import UsageOutbox

AT = datetime(2026, 11, 26, 9, tzinfo=UTC)


def report(i: int) -> UsageReport:
    return UsageReport(UsageEvent(f"req-{i}", "t", "k", "m", 10 + i, i, 5, AT, AT, "ok"), 100)


class FlakyBillingDouble:
    """Acknowledges what it receives, after failing the first ``failures`` sends (billing restarting)."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.received: list[str] = []

    async def send(self, reports: Sequence[UsageReport]) -> Sequence[str]:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("billing down (double)")
        self.received.extend(r.event.request_id for r in reports)
        return [r.event.request_id for r in reports]


async def test_reports_are_retried_until_acknowledged() -> None:
    billing = FlakyBillingDouble(failures=3)
    outbox = UsageOutbox(billing.send, flush_interval_s=0.01, max_backoff_s=0.05)
    task = asyncio.create_task(outbox.run())
    for i in range(5):
        outbox.submit(report(i))
    outbox.submit(report(0))  # the same billing id twice is one report
    for _ in range(200):
        if not outbox.pending:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    assert outbox.pending == 0 and outbox.failed_sends == 3
    assert sorted(billing.received) == [f"req-{i}" for i in range(5)]


async def test_a_dead_replicas_spool_is_adopted_by_the_next(tmp_path: Path) -> None:
    class LosesOneDouble(FlakyBillingDouble):
        """Billing that went away before acknowledging req-3."""

        async def send(self, reports: Sequence[UsageReport]) -> Sequence[str]:
            return [i for i in await super().send(reports) if i != "req-3"]

    first = UsageOutbox(LosesOneDouble().send, spool_dir=tmp_path)
    for i in range(4):
        first.submit(report(i))
    assert await first.flush_once() == 3 and first.pending == 1
    # The replica dies without draining: its spool file stays; its lock goes with it (here: the file is closed).
    assert first._spool is not None
    first._spool.close()

    later = FlakyBillingDouble()
    second = UsageOutbox(later.send, spool_dir=tmp_path)
    assert second.pending == 1  # only the report that was never acknowledged
    await second.flush_once()
    assert later.received == ["req-3"]
    assert second._spool is not None and list(tmp_path.iterdir()) == [second._spool.path]
    second.close()
    assert list(tmp_path.iterdir()) == []  # nothing pending: the file goes


async def test_a_live_replicas_spool_is_left_alone(tmp_path: Path) -> None:
    down = FlakyBillingDouble(failures=10**6)
    alive = UsageOutbox(down.send, spool_dir=tmp_path)
    alive.submit(report(1))
    other = UsageOutbox(FlakyBillingDouble().send, spool_dir=tmp_path)
    assert other.pending == 0 and alive.pending == 1
    assert len(list(tmp_path.iterdir())) == 2
