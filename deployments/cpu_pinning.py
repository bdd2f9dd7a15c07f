"""CPU pinning on a machine where vLLM runs on CPUs: its CPU workers bind to cores of their own
(``VLLM_CPU_OMP_THREADS_BIND``), each engine core runs beside its workers, and everything else keeps off them
(``ray.cpu_affinity``).

A worker that shares its core waits for it: on 2 cores, with Ray, Serve, HAProxy and the replicas free to run on the
worker's core, the worker got about 85 % of it, and Anker reached 0.57-0.80x bare vLLM's output tokens/s; pinned
apart, 0.81-0.92x. The engine core is the exception: it and its workers take turns (the engine core schedules a step,
the workers run it, and each waits for the other spinning on ``sched_yield``), so on the workers' cores its wait
yields to them and costs almost nothing, while beside the replicas its spin took a core's worth of time from them:
7 instead of 36-63 CPU ms per request, and 1.17-1.44x bare vLLM's output tokens/s instead of 0.98-1.12x
(``docs/benchmarks/anker-vs-vllm.md``). Linux only (``/proc`` and ``sched_setaffinity``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path


def _parents() -> dict[int, int]:
    """Every process's parent, from /proc (the fourth field of a process's stat line)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()[1])
    return parents


def children(pid: int, parents: dict[int, int] | None = None) -> set[int]:
    return {child for child, parent in (parents or _parents()).items() if parent == pid}


def descendants(pid: int) -> set[int]:
    """The processes ``pid`` started, and theirs, and so on."""
    parents = _parents()
    found: set[int] = set()
    todo = [pid]
    while todo:
        below = todo.pop()
        new = {child for child, parent in parents.items() if parent == below} - found
        found |= new
        todo.extend(new)
    return found


def workers_cores(pid: int, outside: set[int], parents: dict[int, int] | None = None) -> set[int]:
    """The cores that ``pid``'s own child processes are bound to apart from ``outside``: a vLLM engine core's CPU
    workers' (nothing, for a process that starts no bound worker)."""
    cores: set[int] = set()
    for child in children(pid, parents):
        with contextlib.suppress(OSError):
            cpus = os.sched_getaffinity(child)
            if cpus.isdisjoint(outside):
                cores |= cpus
    return cores


def pin_threads(pid: int, cpus: Iterable[int]) -> None:
    """Every thread of ``pid`` on ``cpus``; threads it starts later inherit the pin. A process or thread that has
    ended meanwhile is passed over."""
    mask = set(cpus)
    threads: list[str] = []
    with contextlib.suppress(OSError):
        threads = os.listdir(f"/proc/{pid}/task")
    for thread in threads:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(thread), mask)


def pin_tree(root: int, cpus: Iterable[int]) -> int:
    """``root`` and every process it started on ``cpus``, but a process that has bound itself to other CPUs only (a
    vLLM CPU worker's bound threads), and a process that started such workers (a vLLM engine core), which goes on
    their cores. How many processes it pinned."""
    mask = set(cpus)
    parents = _parents()
    pinned = 0
    for pid in [root, *sorted(descendants(root))]:
        try:
            own = os.sched_getaffinity(pid)
        except OSError:
            continue
        if own.isdisjoint(mask):
            continue
        pin_threads(pid, workers_cores(pid, mask, parents) or mask)
        pinned += 1
    return pinned


@contextlib.contextmanager
def workers_cores_free() -> Iterator[None]:
    """Starts vLLM so that its CPU workers may bind to cores this process does not run on, and puts its engine core
    beside them.

    A pinned head (``ray.cpu_affinity``) pins every process it starts, an engine replica among them. A CPU worker
    binds its OpenMP threads to the cores ``VLLM_CPU_OMP_THREADS_BIND`` names, and OpenMP refuses cores outside the
    process's CPUs; so the engine core, which starts the workers, starts with every CPU, and once the engine runs,
    the engine core (this process's new child processes, every thread of them) goes onto its workers' cores, where
    the two take turns (the module's docstring), or back to this process's CPUs if it started no bound worker. With
    every CPU already this process's (an unpinned head), nothing changes here: ``pin_tree`` places them later."""
    own = os.sched_getaffinity(0)
    every = set(range(os.cpu_count() or 1))
    if own >= every:
        yield
        return
    me = os.getpid()
    before = children(me)
    os.sched_setaffinity(0, every)  # this thread's, which starts the engine core: the child inherits it
    try:
        yield
    finally:
        os.sched_setaffinity(0, own)
        for pid in children(me) - before:
            pin_threads(pid, workers_cores(pid, own) or own)
