"""The control-plane benchmark (loadtests/control_plane.py) at tiny size, run as its documented command: it starts
a Ray instance of its own, deploys the stack behind HAProxy (an engine replica whose engine client answers
at once), drives it and the billing actor, and its ledger checks must pass.

No timing threshold: only that every figure is there and sane, every answer was right and every request was billed
exactly once, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.stack

ROOT = Path(__file__).resolve().parent.parent
# HAProxy, the engine replica (door and vLLM's serving layer) and the billing actor each did work for every row; the
# control application serves no generation, and Serve's proxy actor only manages HAProxy.
PARTS = ("HAProxy", "Engine", "Billing")


def test_control_plane_benchmark_measures_and_bills_each_request_once(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    results, report = tmp_path / "results.json", tmp_path / "control-plane.md"
    command = [
        sys.executable,
        "-m",
        "loadtests.control_plane",
        "--concurrency",
        "2",
        "--duration-s",
        "2",
        "--warmup-s",
        "0.5",
        "--output-tokens",
        "4",
        "--tokens-per-delta",
        "1,4",
        "--batch-sizes",
        "1,8",
        "--billing-senders",
        "2",
        "--billing-duration-s",
        "1",
        "--billing-rounds",
        "2",
        "--postgres",
        "--native-connections",
        "4",
        "--profile-s",
        "2",
        "--models-dir",
        str(tiny_models["qwen3-next-tiny"].parent),
        "--json",
        str(results),
        "--report",
        str(report),
    ]
    # Its own Ray instance: nothing of a cluster this test process may have joined (address, auth token) leaks in.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"benchmark failed ({done.returncode}):\n{done.stderr[-6000:]}"

    summary = json.loads(results.read_text())
    assert summary["all_checks_passed"] is True
    ingress = summary["ingress"]
    assert sorted((row["tokens_per_delta"], row["stream"], row["concurrency"]) for row in ingress) == [
        (1, False, 2),
        (1, True, 2),
        (4, False, 2),
        (4, True, 2),
    ]
    for row in ingress:
        assert row["errors"] == {}, row
        assert row["successes"] == row["requests"] > 0
        assert row["requests_per_s"] > 0 and row["output_tokens_per_s"] == pytest.approx(row["requests_per_s"] * 4)
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        assert row["ledger_ok_rows"] == row["successes"] and row["ledger_other_rows"] == 0
        assert row["ledger_tokens_match"] is True and row["ledger_cached_tokens"] > 0  # the double reports them
        assert all(row["cpu_s"].get(part, 0) > 0 for part in PARTS), row["cpu_s"]  # each part did the work
        assert 0 < row["machine_busy_share"] <= 1

    # wrk on the same stack: its answers all 200, each billed once (the ledger against its counts), each part busy;
    # then py-spy's profile of the engine replica, whose GIL time goes to vLLM's serving layer and to Anker's door.
    native = summary["native"]
    assert sorted((row["stream"], row["connections"]) for row in native) == [(False, 4), (True, 4)]
    for row in native:
        assert row["successes"] == row["requests"] > 0 and row["not_2xx"] == row["socket_errors"] == 0, row
        assert row["requests_per_s"] > 0 and row["wrk_cpu_s"] > 0 and row["ledger_passed"] is True, row
        assert row["successes"] <= row["ledger_ok_rows"] <= row["successes"] + 4
        assert all(row["cpu_s"].get(part, 0) > 0 for part in PARTS), row["cpu_s"]
    profile = summary["profile"]
    assert profile["samples"] > 0 and 0 < profile["gil_share"] <= 1
    assert profile["by_owner"]["vLLM"] > 0 and profile["by_owner"]["Anker"] > 0

    billing = summary["billing"]
    assert sorted((row["database"], row["batch_size"], row["round"]) for row in billing) == sorted(
        (database, size, round_) for database in ("SQLite", "PostgreSQL") for size in (1, 8) for round_ in (0, 1)
    )
    for row in billing:
        assert row["events"] > 0 and row["events_per_s"] > 0
        assert row["ledger_events"] == row["events"], row
        assert row["replay_added"] == 0 and row["recorded_once"] is True
        assert row["events"] % row["batch_size"] == 0  # whole batches, each acknowledged in full

    text = report.read_text()
    assert "python -m loadtests.control_plane --concurrency 2" in text
    assert "## An engine replica through HAProxy" in text and "## Billing actor" in text and "## Headroom" in text
    assert "## The engine replica under a native load client" in text and "### Where the engine replica's" in text
    assert "❌" not in text
