"""Soak: ramp to ``ANKER_SOAK_USERS`` over ``ANKER_SOAK_RAMP_S`` seconds and hold until ``ANKER_SOAK_DURATION_S``."""

from __future__ import annotations

from locust import LoadTestShape

from loadtests.shapes import env_int


class SoakShape(LoadTestShape):
    """A moderate load held for a long time: shows leaks, drift and slow failures."""

    def __init__(self) -> None:
        super().__init__()
        self.users = env_int("ANKER_SOAK_USERS", 4)
        self.ramp_s = env_int("ANKER_SOAK_RAMP_S", 60)
        self.duration_s = env_int("ANKER_SOAK_DURATION_S", 3600)

    def tick(self) -> tuple[int, float] | None:
        if self.get_run_time() >= self.duration_s:
            return None
        return self.users, max(self.users / max(self.ramp_s, 1), 0.1)
