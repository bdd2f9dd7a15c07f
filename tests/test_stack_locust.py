"""Locust against the real stack: a 30 s headless run of every user class (no failures, TTFT, ITL and throughput
recorded, and the API billed exactly what Locust saw), and the web UI serving its page.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from loadtests.workloads import SHARED_SYSTEM_PROMPT
from testkit.ports import free_port
from tests.conftest import ROOT, Stack

pytestmark = pytest.mark.stack

LOCUST = str(Path(sys.executable).parent / "locust")
WORKLOADS = ("short_chat", "shared_prefix", "multi_turn")  # the Name of each user class's rows
METRICS = ("TTFT", "ITL", "TOK/S")


USERS = 6


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def billed_totals(stack: Stack, key: str, requests: int, timeout_s: float = 60.0) -> dict[str, int]:
    """The key's organisation's usage totals once ``requests`` requests arrived (usage is delivered asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = httpx.get(f"{stack.base_url}/v1/usage", headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert r.status_code == 200, r.text
        totals: dict[str, int] = r.json()["totals"]
        if totals["requests"] >= requests or time.monotonic() > deadline:
            return totals
        time.sleep(1)


def test_headless_run_of_every_user_class(stack: Stack, tmp_path: Path) -> None:
    key = stack.new_key("locust")
    run = subprocess.run(
        [
            LOCUST,
            *("-f", "loadtests/locustfile.py", "--headless", "-u", str(USERS), "-r", str(USERS), "-t", "30s"),
            # Users finish the request they are in, so that Locust saw every request the API billed.
            *("--stop-timeout", "60", "--host", stack.base_url, "--model", "qwen3-next-tiny"),
            *("--csv", str(tmp_path / "run"), "--only-summary"),
        ],
        cwd=ROOT,
        env={**os.environ, "ANKER_API_KEY": key},
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    assert SHARED_SYSTEM_PROMPT.split("\n\n")[1][:80] not in output  # zero data retention: no prompt logged

    rows = {(row["Type"], row["Name"]): row for row in read_csv(tmp_path / "run_stats.csv")}
    assert read_csv(tmp_path / "run_failures.csv") == []
    for workload in WORKLOADS:
        post = rows[("POST", workload)]
        assert int(post["Request Count"]) > 0 and int(post["Failure Count"]) == 0, post
        assert float(post["Average Content Size"]) > 0, post  # output tokens per request
        for metric in METRICS:
            row = rows[(metric, workload)]
            assert int(row["Request Count"]) > 0 and float(row["Average Response Time"]) > 0, row
        assert int(rows[("TTFT", workload)]["Request Count"]) == int(post["Request Count"])
        assert float(rows[("TTFT", workload)]["Average Response Time"]) < float(post["Average Response Time"])

    posts = [rows[("POST", workload)] for workload in WORKLOADS]
    requests = sum(int(row["Request Count"]) for row in posts)
    output_tokens = sum(round(float(row["Average Content Size"]) * int(row["Request Count"])) for row in posts)
    totals = billed_totals(stack, key, requests)
    # Nothing Locust saw is missing. A request a user was in when Locust's stop timeout ended it is billed for what
    # the engine produced but not counted by Locust: at most one per user, of at most max_tokens (32) each.
    assert requests <= totals["requests"] <= requests + USERS, (totals["requests"], requests)
    assert output_tokens <= totals["output_tokens"] <= output_tokens + USERS * 32, (totals, output_tokens)
    assert totals["input_cached_tokens"] > 0  # the shared prefix and the conversations hit the prefix cache


def test_web_ui_serves_its_page(stack: Stack) -> None:
    port = free_port()
    process = subprocess.Popen(
        [
            LOCUST,
            *("-f", "loadtests/locustfile.py,loadtests/shapes", "--class-picker"),
            *("--web-host", "127.0.0.1", "--web-port", str(port), "--host", stack.base_url),
        ],
        cwd=ROOT,
        env={**os.environ, "ANKER_API_KEY": stack.api_key},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        page = wait_for_page(f"http://127.0.0.1:{port}/", process)
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    assert page is not None, f"the web UI did not come up (exit code {process.returncode}):\n{output[-4000:]}"
    assert page.status_code == 200
    assert all(shape in page.text for shape in ("StepShape", "SpikeShape", "SoakShape"))
    assert stack.api_key not in page.text and stack.api_key not in output


def wait_for_page(url: str, process: subprocess.Popen[str], timeout_s: float = 120.0) -> httpx.Response | None:
    deadline = time.monotonic() + timeout_s
    while process.poll() is None and time.monotonic() < deadline:
        try:
            return httpx.get(url, timeout=5)
        except httpx.TransportError:
            time.sleep(0.5)
    return None
