"""CPU time by process while a target is measured: every process of the target's tree (its root and all below it),
grouped by what the process is (a Serve replica by its deployment, vLLM's engine core, HAProxy, Ray's own), from
the kernel's user + system time. CPU milliseconds carry over to other machines; wall-clock figures on a shared
2-core machine do not.

It reads process names and command lines only to tell the processes apart; it never reads or keeps anything else.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable

import psutil

CpuTimes = dict[tuple[int, float], tuple[str, float]]  # (pid, start time) -> (group, CPU seconds)


def group_of(name: str, cmdline: list[str]) -> str:
    """What a process is, for the report: a Serve replica by its deployment, vLLM's engine core, worker and API
    server, HAProxy, the bench's own Ray Serve LLM driver, or Ray's system processes."""
    first = cmdline[0] if cmdline else name
    if first.startswith("ray::ServeReplica:"):
        # Ray's title names the replica's application and deployment, and while it runs one, the method.
        return "replica " + first.removeprefix("ray::ServeReplica:").split(":", 1)[-1].split(".", 1)[0]
    if first.startswith(("ray::ServeController", "ray::ProxyActor", "ray::HAProxyManager")):
        return "Serve controller and proxy"
    # vLLM names its processes (VLLM::EngineCore, VLLM::Worker, VLLM::Worker_TP0, …); the worker runs the model.
    if "EngineCore" in first or "EngineCore" in name:
        return "vLLM engine core"
    if first.startswith("VLLM::Worker") or name.startswith("VLLM::Worker"):
        return "vLLM worker (the model)"
    if name == "haproxy" or first.endswith("/haproxy"):
        return "HAProxy"
    joined = " ".join(cmdline)
    if "vllm.entrypoints.openai.api_server" in joined:
        return "vLLM API server"
    if "loadtests.bench_serve_llm" in joined:
        return "Ray Serve LLM driver"
    return "Ray system and other"


def tree(root: int) -> list[psutil.Process]:
    try:
        top = psutil.Process(root)
        return [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def snapshot(roots: Iterable[int]) -> CpuTimes:
    """CPU seconds so far of every process below ``roots`` (children that have ended are counted in their parent
    only once reaped, so a long-lived server's figures hold; a short-lived child's may be missed)."""
    times: CpuTimes = {}
    for root in roots:
        for process in tree(root):
            try:
                with process.oneshot():
                    cpu = process.cpu_times()
                    key = (process.pid, process.create_time())
                    times[key] = (group_of(process.name(), process.cmdline()), cpu.user + cpu.system)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
    return times


def spent_ms(before: CpuTimes, after: CpuTimes) -> dict[str, float]:
    """CPU milliseconds by group between two snapshots; a process that began in between counts from 0."""
    by_group: dict[str, float] = defaultdict(float)
    for key, (group, seconds) in after.items():
        earlier = before.get(key, (group, 0.0))[1]
        by_group[group] += max(seconds - earlier, 0.0) * 1000
    return dict(by_group)


def own_cpu_s() -> float:
    """This process's CPU seconds (the load client)."""
    times = os.times()
    return times.user + times.system
