"""Step load: ``ANKER_STEP_USERS`` more users every ``ANKER_STEP_S`` seconds, ``ANKER_STEPS`` times, then stop."""

from __future__ import annotations

from locust import LoadTestShape

from loadtests.shapes import env_int


class StepShape(LoadTestShape):
    """Users grow in equal steps, each held long enough to read its latency; the run ends after the last step."""

    def __init__(self) -> None:
        super().__init__()
        self.step_users = env_int("ANKER_STEP_USERS", 2)
        self.step_s = env_int("ANKER_STEP_S", 60)
        self.steps = env_int("ANKER_STEPS", 5)

    def tick(self) -> tuple[int, float] | None:
        step = int(self.get_run_time() // self.step_s)
        if step >= self.steps:
            return None
        return (step + 1) * self.step_users, self.step_users
