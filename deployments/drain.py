"""Graceful drain before a stop: running requests finish, new ones are told to come back later.

Ray Serve's own shutdown drains the replicas but stops its HTTP proxies at once, which closes every stream they
carry. So ``anker down`` drains first, with three parts:

- ``DrainBoard``: a named Ray actor that ``anker down`` creates. While it exists, every ingress replica drains. It
  collects what each ingress replica reports: requests still running and usage reports not yet handed to billing.
- ``DrainGate``: ASGI middleware in each ingress replica. It counts running requests (health probes aside); while
  draining, it answers a new request with 503 ``server_shutting_down`` and ``Retry-After`` (clients retry, as they
  do on any 503), and ``/healthz`` with 503 ``{"status": "draining"}``, so that a load balancer takes the replica
  out.
- ``watch_drain``: the ingress replica's loop that looks for the board and reports to it.

``anker down`` waits until every ingress replica reported nothing running and nothing pending (or
``stack.drain_timeout_s`` passed), and only then shuts Serve down. If ``anker down`` is interrupted it removes the
board, and the ingress replicas serve again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import ray
from starlette.responses import JSONResponse, Response

from config.naming import ENGINE_DEPLOYMENT_PREFIX, MODEL_APP_PREFIX
from deployments.errors import RetryLater
from deployments.openai.errors import error_response

logger = logging.getLogger("ray.serve")

DRAIN_BOARD = "anker-drain"
DRAIN_NAMESPACE = "serve"
LOOK_PERIOD_S = 1.0  # how often a serving ingress replica looks for the board
REPORT_PERIOD_S = 0.25  # how often a draining one reports
SHUTTING_DOWN_RETRY_AFTER_S = 5
HEALTH_PATH = "/healthz"
CONTROL_DEPLOYMENT = "Control"  # deployments/control.py


class ShuttingDown(RetryLater):
    status = 503
    type = "service_unavailable_error"
    code = "server_shutting_down"


@dataclass(frozen=True)
class DrainReport:
    app: str
    replica: str  # the ingress replica's actor name
    running: int  # requests still being answered (streams included)
    pending_usage: int  # usage reports not yet handed to billing


@ray.remote(num_cpus=0)
class DrainBoard:
    """While this actor exists, ingress replicas drain and report here (see the module's docstring)."""

    def __init__(self) -> None:
        self._reports: dict[str, DrainReport] = {}
        self._first: dict[str, DrainReport] = {}

    def report(self, report: DrainReport) -> None:
        self._reports[report.replica] = report
        self._first.setdefault(report.replica, report)

    def reports(self) -> dict[str, DrainReport]:
        """Each replica's latest report."""
        return dict(self._reports)

    def first_reports(self) -> dict[str, DrainReport]:
        """Each replica's first report: what it was running when it began to drain."""
        return dict(self._first)


class DrainGate:
    """Pure ASGI middleware: counts running HTTP requests and refuses new ones while draining."""

    def __init__(self, app: Callable[..., Awaitable[None]], retry_after_s: int = SHUTTING_DOWN_RETRY_AFTER_S) -> None:
        self.app = app
        self.draining = False
        self.running = 0
        self._retry_after_s = retry_after_s

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.draining:
            await self._refusal(scope.get("path"))(scope, receive, send)
            return
        if scope.get("path") == HEALTH_PATH:  # a load balancer's probe is not work that a drain waits for
            await self.app(scope, receive, send)
            return
        self.running += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.running -= 1

    def _refusal(self, path: str | None) -> Response:
        retry_after = str(self._retry_after_s)
        if path == HEALTH_PATH:  # a load balancer takes this replica out
            return JSONResponse({"status": "draining"}, status_code=503, headers={"Retry-After": retry_after})
        message = "The server is shutting down for maintenance. Please retry shortly."
        return error_response(ShuttingDown(message, retry_after_s=self._retry_after_s))


async def watch_drain(
    gate: DrainGate, app: str, replica: str, pending_usage: Callable[[], int], period_s: float = LOOK_PERIOD_S
) -> None:
    """An ingress replica's loop: drains while the board exists, reporting what it still has to finish."""
    while True:
        board = await asyncio.to_thread(_board)
        if board is not None and not gate.draining:
            logger.info("draining: new requests are refused, %d running ones finish", gate.running)
        elif board is None and gate.draining:
            logger.info("drain called off: serving again")
        gate.draining = board is not None
        if board is None:
            await asyncio.sleep(period_s)
            continue
        report = DrainReport(app, replica, gate.running, pending_usage())
        with contextlib.suppress(ray.exceptions.RayError):
            await board.report.remote(report)
        await asyncio.sleep(REPORT_PERIOD_S)


def _board() -> Any:
    try:
        return ray.get_actor(DRAIN_BOARD, namespace=DRAIN_NAMESPACE)
    except ValueError:  # no such actor: not draining
        return None


@dataclass(frozen=True)
class DrainOutcome:
    drained: bool
    running: int  # requests still running when the drain ended (0 if drained)
    pending_usage: int
    seconds: float


_held_boards: list[Any] = []  # this process's handles to the boards it made (see drain_ingresses)


def drain_ingresses(
    timeout_s: float, say: Callable[[str], None], poll_s: float = REPORT_PERIOD_S, hold: bool = False
) -> DrainOutcome:
    """Drains every application's ingress replicas (this process is a driver on the cluster): returns once each
    running one has reported nothing running and nothing pending, or after ``timeout_s``. The board lives while
    this process does, or with ``hold`` until ``stop_draining`` or the cluster's end (a pod's stop hook, which
    returns before the pod stops). ``stop_draining`` (or this process ending, without ``hold``) calls it off."""
    from ray import serve

    started = time.monotonic()
    # A board of our own, made now (or the one a concurrent drain made): every report on it was made while draining.
    options: dict[str, Any] = {"name": DRAIN_BOARD, "namespace": DRAIN_NAMESPACE, "get_if_exists": True}
    if hold:
        options["lifetime"] = "detached"
    board = DrainBoard.options(**options).remote()  # type: ignore[attr-defined]
    # Ray ends an actor when the last handle to it goes: held here, the board outlives this call, so that the
    # ingress replicas keep refusing until this process ends (`anker down` stops Serve first).
    _held_boards.append(board)
    said = 0.0
    began = False
    while True:
        expected = _running_ingress_replicas(serve.status())
        reports = list(ray.get(board.reports.remote()).values())
        running = sum(r.running for r in reports)
        pending = sum(r.pending_usage for r in reports)
        reported = Counter(r.app for r in reports)  # one report per replica: the board keeps each one's latest
        complete = all(reported[app] >= n for app, n in expected.items())
        elapsed = time.monotonic() - started
        if complete and not began:
            began = True
            at_start = sum(r.running for r in ray.get(board.first_reports.remote()).values())
            say(f"  every ingress replica is draining; {at_start} requests were running when it began")
        if complete and running == 0 and pending == 0:
            return DrainOutcome(True, 0, 0, elapsed)
        if elapsed >= timeout_s:
            return DrainOutcome(False, running, pending, elapsed)
        if elapsed - said >= 5:
            said = elapsed
            say(f"  draining: {running} requests running, {pending} usage reports pending")
        time.sleep(poll_s)


def wait_for_drain(timeout_s: float, poll_s: float = LOOK_PERIOD_S) -> bool:
    """Whether a drain begins (the board appears) within ``timeout_s``: a worker pod's stop hook follows the head's
    drain this way, and lets a pod that the autoscaler removes go once the window passed."""
    deadline = time.monotonic() + timeout_s
    while _board() is None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
    return True


def stop_draining() -> None:
    with contextlib.suppress(ValueError):
        ray.kill(ray.get_actor(DRAIN_BOARD, namespace=DRAIN_NAMESPACE), no_restart=True)


def _running_ingress_replicas(status: Any) -> dict[str, int]:
    """Running ingress replicas per application, from ``serve.status()``: the control application's ``Control``,
    and a model application's engine replicas, which serve HTTP themselves (its ingress request router, if any,
    holds no request: HAProxy sends them to the replicas)."""
    counts: dict[str, int] = {}
    for app, app_status in status.applications.items():
        if app.startswith(MODEL_APP_PREFIX):
            ingresses = [d for name, d in app_status.deployments.items() if name.startswith(ENGINE_DEPLOYMENT_PREFIX)]
        else:
            ingresses = [d for name, d in app_status.deployments.items() if name == CONTROL_DEPLOYMENT]
        if ingresses:
            counts[app] = sum(int(d.replica_states.get("RUNNING", 0)) for d in ingresses)
    return counts
