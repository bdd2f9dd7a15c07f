"""A pinned head leaves vLLM's CPU workers their cores: pinning a process tree passes over a process bound to other
CPUs and puts the process that started it (an engine core) on its cores, and a replica starts its engine core with
every CPU, so that the workers may bind beside the head, and then puts the engine core beside its workers (or back
on the replica's own CPUs, if it started none)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from deployments.cpu_pinning import descendants, pin_tree

# In a process pinned to the last CPU, as a pinned head pins its replicas: a child started inside the block, as the
# engine core is (which, with WORKER, first starts a worker bound to the first CPU, as vLLM's binding binds one), and
# what each one runs on.
PINNED_REPLICA = textwrap.dedent(
    """
    import json, os, subprocess, sys
    from deployments.cpu_pinning import workers_cores_free

    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    worker = "import os, time; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); time.sleep(60)"
    engine_core = (
        "import os, subprocess, sys, time; "
        + (f"subprocess.Popen([sys.executable, '-c', {worker!r}]); time.sleep(1); " if sys.argv[1] == "WORKER" else "")
        + "print(sorted(os.sched_getaffinity(0)), flush=True); time.sleep(60)"
    )
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
        subprocess.run(["pkill", "-9", "-P", str(child.pid)])
        child.kill()
    """
)


def pinned_replica(worker: bool) -> dict[str, list[int]]:
    argv = [sys.executable, "-c", PINNED_REPLICA, "WORKER" if worker else "-"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    seen: dict[str, list[int]] = json.loads(out.stdout)
    return seen


def test_engine_core_starts_with_every_cpu_and_returns_to_the_replicas() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.fail(f"this test needs 2 CPUs to pin apart; this machine gives {cpus}")
    seen = pinned_replica(worker=False)
    assert seen["started_with"] == cpus  # so a worker it starts may bind to a CPU the replica does not run on
    assert seen["replica"] == [cpus[-1]]  # the replica's own thread is back on its CPU
    assert seen["after"] and all(thread == [cpus[-1]] for thread in seen["after"])  # so is every engine core thread


def test_an_engine_core_with_a_bound_worker_goes_on_the_workers_core() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.fail(f"this test needs 2 CPUs to pin apart; this machine gives {cpus}")
    seen = pinned_replica(worker=True)
    assert seen["replica"] == [cpus[-1]]
    # The engine core and its worker take turns on the worker's core; the replica's CPU is left to the rest.
    assert seen["after"] and all(thread == [cpus[0]] for thread in seen["after"]), seen


# A head's tree: an engine core that starts a worker bound to the first CPU (as vLLM's OpenMP binding binds one), and
# a plain child, which starts a grandchild. The worker and the grandchild print their pids once they run.
TREE = textwrap.dedent(
    """
    import os, subprocess, sys, time
    first = min(os.sched_getaffinity(0))
    # One write a line: when a child's stdout is unbuffered (PYTHONUNBUFFERED in the environment), print writes a
    # pid and its newline apart, and the two processes' lines can interleave (the whole suite once read "\\n").
    say = "os.write(1, (str(os.getpid()) + chr(10)).encode())"
    code = f"import os, sys, time; {say}; time.sleep(60)"
    bound = f"import os, time; os.sched_setaffinity(0, {{{first}}}); {say}; time.sleep(60)"
    parent = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {!r}]); time.sleep(60)"
    for source in (parent.format(bound), parent.format(code)):
        subprocess.Popen([sys.executable, "-c", source])
    time.sleep(60)
    """
)


def test_a_pinned_tree_leaves_a_bound_worker_on_its_cores_with_its_engine_core() -> None:
    from deployments.cpu_pinning import children

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.fail(f"this test needs 2 CPUs to pin apart; this machine gives {cpus}")
    head = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(head.stdout.readline()) for _ in range(2)]  # type: ignore[union-attr]
        tree = descendants(head.pid)
        assert set(pids) <= tree and len(tree) == 4
        time.sleep(0.5)  # the worker has bound itself by the time it printed; its pid is one of the two
        assert pin_tree(head.pid, [cpus[-1]]) == 4  # the head, its two children and the grandchild
        on = {pid: {frozenset(os.sched_getaffinity(int(t))) for t in os.listdir(f"/proc/{pid}/task")} for pid in tree}
        on[head.pid] = {frozenset(os.sched_getaffinity(head.pid))}
        first = {frozenset([cpus[0]])}
        worker = next(pid for pid in pids if on[pid] == first)
        engine_core = next(pid for pid in tree if worker in children(pid))
        assert on[engine_core] == first, on  # beside its worker
        rest = [pid for pid in [head.pid, *tree] if pid not in (worker, engine_core)]
        assert len(rest) == 3 and all(on[pid] == {frozenset([cpus[-1]])} for pid in rest), on
    finally:
        for pid in descendants(head.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        head.kill()
