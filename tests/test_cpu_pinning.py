"""A pinned head leaves vLLM's CPU workers their cores: pinning a process tree passes over a process bound to other
CPUs, and a replica starts its engine core with every CPU, so that the workers may bind beside the head, and then
puts the engine core back on the replica's own CPUs."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap

import pytest

from deployments.cpu_pinning import descendants, pin_tree

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


# A head's tree: a worker bound to the first CPU (as vLLM's OpenMP binding binds one) and a plain child, which starts
# a grandchild. The worker and the grandchild print their pids once they run.
TREE = textwrap.dedent(
    """
    import os, subprocess, sys, time
    first = min(os.sched_getaffinity(0))
    code = "import os, sys, time; print(os.getpid(), flush=True); time.sleep(60)"
    bound = f"import os, time; os.sched_setaffinity(0, {{{first}}}); print(os.getpid(), flush=True); time.sleep(60)"
    parent = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {code!r}]); time.sleep(60)"
    for source in (bound, parent):
        subprocess.Popen([sys.executable, "-c", source])
    time.sleep(60)
    """
)


def test_a_pinned_tree_leaves_a_bound_worker_on_its_cores() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.fail(f"this test needs 2 CPUs to pin apart; this machine gives {cpus}")
    head = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(head.stdout.readline()) for _ in range(2)]  # type: ignore[union-attr]
        tree = descendants(head.pid)
        assert set(pids) <= tree and len(tree) == 3
        assert pin_tree(head.pid, [cpus[-1]]) == 3  # the head, its plain child and the grandchild
        on = {pid: {frozenset(os.sched_getaffinity(int(t))) for t in os.listdir(f"/proc/{pid}/task")} for pid in tree}
        bound = next(pid for pid in tree if on[pid] == {frozenset([cpus[0]])})
        assert all(threads == {frozenset([cpus[-1]])} for pid, threads in on.items() if pid != bound), on
        assert os.sched_getaffinity(head.pid) == {cpus[-1]}
    finally:
        for pid in descendants(head.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        head.kill()
