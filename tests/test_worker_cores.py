"""A pinned head leaves vLLM's CPU workers their cores: the replica starts its engine core with every CPU, so that
the workers may bind beside the head, and then puts the engine core back on the replica's own CPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

# In a process pinned to the last CPU, as a pinned head pins its replicas: a child started inside the block, as the
# engine core is, and what each one runs on.
PINNED_REPLICA = textwrap.dedent(
    """
    import json, os, subprocess, sys
    from deployments.cpu_pinning import workers_cores_free

    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    engine_core = "import os, time; print(sorted(os.sched_getaffinity(0)), flush=True); time.sleep(60)"
    with workers_cores_free():
        child = subprocess.Popen(
            [sys.executable, "-c", engine_core],
            stdout=subprocess.PIPE,
            text=True,
        )
        started_with = json.loads(child.stdout.readline())
    try:
        threads = [sorted(os.sched_getaffinity(int(t))) for t in os.listdir(f"/proc/{child.pid}/task")]
        print(json.dumps({"started_with": started_with, "replica": sorted(os.sched_getaffinity(0)), "after": threads}))
    finally:
        child.kill()
    """
)


def test_engine_core_starts_with_every_cpu_and_returns_to_the_replicas() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.fail(f"this test needs 2 CPUs to pin apart; this machine gives {cpus}")
    out = subprocess.run([sys.executable, "-c", PINNED_REPLICA], capture_output=True, text=True, timeout=60, check=True)
    seen = json.loads(out.stdout)
    assert seen["started_with"] == cpus  # so a worker it starts may bind to a CPU the replica does not run on
    assert seen["replica"] == [cpus[-1]]  # the replica's own thread is back on its CPU
    assert seen["after"] and all(thread == [cpus[-1]] for thread in seen["after"])  # so is every engine core thread
