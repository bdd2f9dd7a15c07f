"""Spike: ``ANKER_SPIKE_BASE_USERS``, a jump to ``ANKER_SPIKE_PEAK_USERS`` at ``ANKER_SPIKE_AT_S`` for
``ANKER_SPIKE_HOLD_S`` seconds, back to the base until ``ANKER_SPIKE_DURATION_S``."""

from __future__ import annotations

from locust import LoadTestShape

from loadtests.shapes import env_int


class SpikeShape(LoadTestShape):
    """A steady base load with one sudden burst: shows queueing, autoscaling and recovery."""

    def __init__(self) -> None:
        super().__init__()
        self.base_users = env_int("ANKER_SPIKE_BASE_USERS", 2)
        self.peak_users = env_int("ANKER_SPIKE_PEAK_USERS", 16)
        self.at_s = env_int("ANKER_SPIKE_AT_S", 60)
        self.hold_s = env_int("ANKER_SPIKE_HOLD_S", 30)
        self.duration_s = env_int("ANKER_SPIKE_DURATION_S", 180)

    def tick(self) -> tuple[int, float] | None:
        run_s = self.get_run_time()
        if run_s >= self.duration_s:
            return None
        if self.at_s <= run_s < self.at_s + self.hold_s:
            return self.peak_users, self.peak_users  # all spike users within a second
        return self.base_users, self.peak_users
