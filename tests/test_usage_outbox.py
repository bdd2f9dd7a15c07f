"""The ingress's usage outbox: at-least-once delivery with retries, and the spool that outlives a dead replica."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from deployments.billing.ledger import UsageEvent
from deployments.billing.pricing import TokenPrices
from deployments.billing.service import BillingService, BillingSpec
from deployments.contracts import UsageReport
from deployments.usage_outbox import UsageOutbox

AT = datetime(2026, 11, 26, 9, tzinfo=UTC)


def report(i: int) -> UsageReport:
    return UsageReport(UsageEvent(f"req-{i}", "t", "k", "m", 10 + i, i, 5, AT, AT, "ok"))


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


async def test_a_drain_beside_the_flush_loop_sends_no_report_twice(tmp_path: Path) -> None:
    """One batch in flight at a time: a flush that comes while one is sending waits for it, then sends only what
    is still pending (the spool then records one acknowledgement of each report)."""

    class SlowDouble(FlakyBillingDouble):
        async def send(self, reports: Sequence[UsageReport]) -> Sequence[str]:
            await asyncio.sleep(0.05)
            return await super().send(reports)

    billing = SlowDouble()
    outbox = UsageOutbox(billing.send, spool_dir=tmp_path)
    for i in range(3):
        outbox.submit(report(i))
    acked = await asyncio.gather(outbox.flush_once(), outbox.flush_once(), outbox.drain(timeout_s=5.0))
    assert acked == [3, 0, True] and sorted(billing.received) == ["req-0", "req-1", "req-2"]


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


def progress(i: int, output: int) -> UsageReport:
    return UsageReport(UsageEvent(f"req-{i}", "t", "k", "m", 10 + i, i, output, AT, AT, "engine_unavailable"))


async def test_a_dead_replicas_streams_are_billed_up_to_their_last_progress(tmp_path: Path) -> None:
    """Issue 15, hole 9: a replica that dies mid-stream leaves each stream's last progress in its spool, and the
    replica that adopts the spool bills it as ``engine_unavailable``; a stream that ended is billed by its report
    only, once, acknowledged or not."""
    first = UsageOutbox(FlakyBillingDouble().send, spool_dir=tmp_path)
    first.progress(progress(1, 3))
    first.progress(progress(1, 9))  # the latest counts
    first.progress(progress(2, 4))
    first.submit(report(2))  # ended: its report supersedes its progress
    first.progress(progress(3, 2))
    first.submit(report(3))
    assert await first.flush_once() == 2  # reports 2 and 3 acknowledged
    first.progress(progress(4, 1))
    assert first._spool is not None
    first._spool.close()  # the replica dies

    later = FlakyBillingDouble()
    second = UsageOutbox(later.send, spool_dir=tmp_path)
    assert second.pending == 2
    adopted = {r.event.request_id: r.event for r in second._pending.values()}
    assert {i: (e.completion_tokens, e.status) for i, e in adopted.items()} == {
        "req-1": (9, "engine_unavailable"),
        "req-4": (1, "engine_unavailable"),
    }
    await second.flush_once()
    assert sorted(later.received) == ["req-1", "req-4"]
    second.close()
    assert list(tmp_path.iterdir()) == []


async def test_progress_outlives_compaction_and_a_live_stream_keeps_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import deployments.usage_outbox as usage_outbox

    monkeypatch.setattr(usage_outbox, "COMPACT_BYTES", 0)  # every acknowledgement that empties the outbox compacts
    outbox = UsageOutbox(FlakyBillingDouble().send, spool_dir=tmp_path)
    outbox.progress(progress(7, 5))
    outbox.submit(report(1))
    assert await outbox.flush_once() == 1
    assert outbox._spool is not None
    lines = outbox._spool.path.read_text().splitlines()
    assert lines == [lines[0]] and '"p"' in lines[0] and '"req-7"' in lines[0]  # truncated, the stream written again
    outbox.close()  # a stream still open (the replica stopped mid-stream): the file stays for an adopter
    assert list(tmp_path.iterdir()) == [outbox._spool.path]
    adopter = UsageOutbox(FlakyBillingDouble().send, spool_dir=tmp_path)
    assert [r.event.completion_tokens for r in adopter._pending.values()] == [5]
    adopter.close()


async def test_without_a_spool_progress_is_not_kept() -> None:
    outbox = UsageOutbox(FlakyBillingDouble().send)
    outbox.progress(progress(1, 3))
    assert outbox.pending == 0 and not outbox._progress


async def test_a_live_replicas_spool_is_left_alone(tmp_path: Path) -> None:
    down = FlakyBillingDouble(failures=10**6)
    alive = UsageOutbox(down.send, spool_dir=tmp_path)
    alive.submit(report(1))
    other = UsageOutbox(FlakyBillingDouble().send, spool_dir=tmp_path)
    assert other.pending == 0 and alive.pending == 1
    assert len(list(tmp_path.iterdir())) == 2


async def test_a_report_billing_cannot_record_is_set_aside_and_the_outbox_moves_on(tmp_path: Path) -> None:
    """Issue 15, hole 3: a report of a model without a price used to fail its whole batch in the billing
    deployment, so the outbox re-sent that batch forever and nothing of its replica was billed again. Now the
    billing deployment's own class (on a real SQLite ledger) records the rest, sets the bad one aside with its
    reason, and acknowledges all: the outbox empties and later reports flow."""
    prices = TokenPrices.from_dkk_per_million(Decimal("6.00"), Decimal("3.00"), Decimal("45.00"))
    billing = BillingService(BillingSpec(tmp_path, None, {"m": prices}, default_rpm=60, default_tpm=100_000))
    outbox = UsageOutbox(billing.record, flush_interval_s=0.01, max_batch=3)
    now = datetime.now(UTC)  # billing prices its models from its start on

    def usage(request_id: str, model: str = "m") -> UsageReport:
        return UsageReport(UsageEvent(request_id, "t", "k", model, 10, 0, 5, now, now, "ok"))

    for submitted in (usage("req-1"), usage("req-unpriced", "not-priced"), usage("req-2"), usage("req-3")):
        outbox.submit(submitted)
    task = asyncio.create_task(outbox.run())
    try:
        async with asyncio.timeout(30):
            while outbox.pending:
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
    assert outbox.failed_sends == 0
    assert billing.ledger.request_ids("t") == ["req-1", "req-2", "req-3"]
    [aside] = billing.ledger.set_aside()
    assert (aside["request_id"], aside["model"], aside["reason"]) == ("req-unpriced", "not-priced", "unpriced_model")
