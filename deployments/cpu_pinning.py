"""CPU pinning on a machine where vLLM runs on CPUs: its CPU workers bind to cores of their own
(``VLLM_CPU_OMP_THREADS_BIND``), and everything else keeps off them (``ray.cpu_affinity``).

A worker that shares its core waits for it: on 2 cores, with Ray, Serve, HAProxy and the replicas free to run on the
worker's core, the worker got about 85 % of it, and Anker reached 0.57-0.80x bare vLLM's output tokens/s; pinned
apart, 0.81-0.92x (``docs/benchmarks/anker-vs-vllm.md``). Linux only (``/proc`` and ``sched_setaffinity``).
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


def children(pid: int) -> set[int]:
    return {child for child, parent in _parents().items() if parent == pid}


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
    vLLM CPU worker's bound threads). How many processes it pinned."""
    mask = set(cpus)
    pinned = 0
    for pid in [root, *sorted(descendants(root))]:
        try:
            own = os.sched_getaffinity(pid)
        except OSError:
            continue
        if own.isdisjoint(mask):
            continue
        pin_threads(pid, mask)
        pinned += 1
    return pinned


@contextlib.contextmanager
def workers_cores_free() -> Iterator[None]:
    """Starts vLLM so that its CPU workers may bind to cores this process does not run on, and keeps its engine core
    on this process's own CPUs.

    A pinned head (``ray.cpu_affinity``) pins every process it starts, an engine replica among them. A CPU worker
    binds its OpenMP threads to the cores ``VLLM_CPU_OMP_THREADS_BIND`` names, and OpenMP refuses cores outside the
    process's CPUs; so the engine core, which starts the workers, starts with every CPU, and once the engine runs,
    the engine core (this process's new child processes, every thread of them) goes back to this process's CPUs.
    The workers keep the cores they bound to, and have them to themselves. With every CPU already this process's
    (an unpinned head), nothing changes."""
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
            pin_threads(pid, own)
