"""The ingress's usage outbox: every finished request's usage report waits here until the billing actor has
acknowledged it (the ledger committed it), and is re-sent until then: at-least-once delivery.

A stream being delivered has a progress report too (``progress``): what the replica has sent its client so far, as
if the engine had failed there. It never leaves the replica while the replica lives (the stream's final report
replaces it); it is in the spool so that a replica that dies mid-stream leaves its streams' usage behind, and the
replica that adopts the spool bills them as ``engine_unavailable`` up to their last progress.

Reports are keyed by billing id, so a report never leaves twice in one batch and a replay is harmless (the ledger
ignores ids it has). With a spool folder, every report and acknowledgement is also appended to this replica's
spool file (counts and ids only, never content), locked while the replica lives; a new replica adopts the files of
replicas that died and sends what they held. It must never drop a report to make room.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from deployments.billing.ledger import UsageEvent
from deployments.contracts import UsageReport

logger = logging.getLogger("ray.serve")

Send = Callable[[Sequence[UsageReport]], Awaitable[Sequence[str]]]


COMPACT_BYTES = 1 << 20


def report_to_json(report: UsageReport) -> dict[str, Any]:
    e = report.event
    return {
        "id": e.request_id,
        "tenant": e.tenant,
        "key": e.key_id,
        "model": e.model,
        "prompt": e.prompt_tokens,
        "cached": e.cached_tokens,
        "completion": e.completion_tokens,
        "started": e.started_at.isoformat(),
        "finished": e.finished_at.isoformat(),
        "status": e.status,
        "lease": report.lease_id,
    }


def report_from_json(d: dict[str, Any]) -> UsageReport:
    event = UsageEvent(
        request_id=d["id"],
        tenant=d["tenant"],
        key_id=d["key"],
        model=d["model"],
        prompt_tokens=d["prompt"],
        cached_tokens=d["cached"],
        completion_tokens=d["completion"],
        started_at=datetime.fromisoformat(d["started"]),
        finished_at=datetime.fromisoformat(d["finished"]),
        status=d["status"],
    )
    return UsageReport(event, d.get("lease"))  # a spool written before leases has none: settled without one


class Spool:
    """This replica's append-only spool file, locked for its lifetime, and the adoption of dead replicas' files.

    Lines are ``{"r": report}``, ``{"p": report}`` (a stream's progress) and ``{"a": [ids]}``; what is reported and
    not acknowledged is pending, and so is the last progress of a request with no report. Appends are flushed to the
    OS at once, so they survive the process (not the machine); compaction truncates a file with nothing pending, and
    the outbox writes its streams' progress again.
    """

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.path = folder / f"{uuid.uuid4().hex}.jsonl"
        self._file: IO[str] = self.path.open("a", encoding="utf-8")
        fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _append(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()

    def reported(self, report: UsageReport) -> None:
        self._append({"r": report_to_json(report)})

    def progressed(self, report: UsageReport) -> None:
        self._append({"p": report_to_json(report)})

    def acknowledged(self, ids: Sequence[str], nothing_pending: bool) -> bool:
        """Notes ``ids`` as recorded; True if that emptied the file (the caller writes its progress again)."""
        if nothing_pending and self._file.tell() > COMPACT_BYTES:
            self._file.truncate(0)
            self._file.seek(0)
            return True
        self._append({"a": list(ids)})
        return False

    def adopt_orphans(self) -> list[UsageReport]:
        """Reports pending in the spool files of replicas that are gone (their lock is free); their files go."""
        adopted: dict[str, UsageReport] = {}
        for path in sorted(self.folder.glob("*.jsonl")):
            if path == self.path:
                continue
            with path.open("r+", encoding="utf-8") as fh:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live replica's
                pending: dict[str, UsageReport] = {}
                ended: set[str] = set()  # requests with a report: their progress is superseded
                in_flight: dict[str, UsageReport] = {}
                for line in fh:
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue  # a line cut short when its writer died
                    if "r" in record:
                        report = report_from_json(record["r"])
                        pending[report.event.request_id] = report
                        ended.add(report.event.request_id)
                    if "p" in record:
                        report = report_from_json(record["p"])
                        in_flight[report.event.request_id] = report
                    for acked in record.get("a", ()):
                        pending.pop(acked, None)
                        ended.add(acked)
                # Streams their replica died delivering: billed up to their last progress (a progress report says
                # ``engine_unavailable``, the status of a request the service failed after delivering some of it).
                pending.update({i: r for i, r in in_flight.items() if i not in ended})
                for report in pending.values():
                    self.reported(report)  # durable in our file before the orphan's goes
                adopted.update(pending)
                path.unlink()
        return list(adopted.values())

    def close(self) -> None:
        self._file.close()


class UsageOutbox:
    def __init__(
        self,
        send: Send,
        flush_interval_s: float = 0.2,
        max_batch: int = 256,
        max_backoff_s: float = 5.0,
        spool_dir: Path | None = None,
    ) -> None:
        self._send = send
        self._flush_interval_s = flush_interval_s
        self._max_batch = max_batch
        self._max_backoff_s = max_backoff_s
        self._pending: dict[str, UsageReport] = {}
        self._progress: dict[str, UsageReport] = {}  # streams being delivered: their last progress
        self._wake = asyncio.Event()
        self._flushing = asyncio.Lock()  # one batch in flight: a drain beside the flush loop sends nothing twice
        self.sent_batches = 0
        self.failed_sends = 0
        self._spool = Spool(spool_dir) if spool_dir is not None else None
        if self._spool is not None:
            adopted = self._spool.adopt_orphans()
            for report in adopted:
                self._pending[report.event.request_id] = report
            if adopted:
                logger.warning("usage outbox: adopted %d undelivered reports of a stopped replica", len(adopted))

    @property
    def pending(self) -> int:
        return len(self._pending)

    def pending_leases(self) -> set[str]:
        """The budget leases of the reports not yet acknowledged: a lease is given back only once billing has
        settled every request drawn from it."""
        return {r.lease_id for r in self._pending.values() if r.lease_id is not None}

    def progress(self, report: UsageReport) -> None:
        """Notes how far a stream has been delivered (only a spool keeps it: a dead replica's adopter bills it);
        never blocks and never fails."""
        if self._spool is None:
            return
        self._progress[report.event.request_id] = report
        try:
            self._spool.progressed(report)
        except OSError as exc:
            logger.error("usage outbox: spool write failed (%s)", type(exc).__name__)

    def submit(self, report: UsageReport) -> None:
        """Queues a report; never blocks and never fails, so the request path can always call it."""
        self._progress.pop(report.event.request_id, None)
        self._pending[report.event.request_id] = report
        if self._spool is not None:
            try:
                self._spool.reported(report)
            except OSError as exc:  # a full disk must not fail the request: the report is still in memory
                logger.error("usage outbox: spool write failed (%s)", type(exc).__name__)
        if len(self._pending) >= self._max_batch:
            self._wake.set()

    async def flush_once(self) -> int:
        """Sends one batch; returns how many were acknowledged. Raises what the send raised (the batch stays). One
        batch at a time: a call made while another is sending waits for it, then sends what is still pending."""
        async with self._flushing:
            if not self._pending:
                return 0
            batch = list(self._pending.values())[: self._max_batch]
            acked = await self._send(batch)
            self.sent_batches += 1
            for billing_id in acked:
                self._pending.pop(billing_id, None)
            if self._spool is not None and acked:
                with contextlib.suppress(OSError):
                    if self._spool.acknowledged(list(acked), not self._pending):
                        for report in list(self._progress.values()):
                            self._spool.progressed(report)
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

    def close(self) -> None:
        """Releases the spool file: kept if reports are pending or streams unfinished (a later replica adopts them),
        removed if not."""
        if self._spool is not None:
            self._spool.close()
            if not self._pending and not self._progress:
                with contextlib.suppress(OSError):
                    os.unlink(self._spool.path)
