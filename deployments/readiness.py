"""Whether a deployment answers: a watch that probes its ``ready`` method, quickly while it is not ready.

The control application watches each model's application with it (``deployments/control.py``).
"""

from __future__ import annotations

import asyncio

from ray.serve.handle import DeploymentHandle

READY_PROBE_TIMEOUT_S = 10.0
READY_PROBE_PERIOD_S = 5.0
NOT_READY_PROBE_PERIOD_S = 1.0


class ReadinessWatch:
    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    async def watch(self) -> None:
        """Keeps ``ready`` current. A probe that times out changes nothing: a saturated replica answers late (the
        probe queues behind requests) but is not down. Errors or a dead engine make it not ready; a request that ends
        badly (a client leaving mid-stream, say) never does."""
        while True:
            try:
                self._ready = bool(await asyncio.wait_for(self._handle.ready.remote(), READY_PROBE_TIMEOUT_S))
            except asyncio.CancelledError:
                raise
            except TimeoutError:
                pass
            except Exception:
                self._ready = False
            await asyncio.sleep(READY_PROBE_PERIOD_S if self._ready else NOT_READY_PROBE_PERIOD_S)
