"""CPU time per part of the benchmark's own Ray cluster (load client, HTTP proxy, each Serve deployment, the rest of
Ray) and of the whole machine, sampled from the OS between two moments.

It reads only processes this process started (its children, found by their Ray process titles); it never signals
or changes any process.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import psutil

# Ray names a replica's process ``ray::ServeReplica:<app>:<deployment>``: the deployment says which part it is.
PROXY_TITLE = "ray::ProxyActor"
REPLICA_TITLE = "ray::ServeReplica:"
CLIENT = "load client"
PROXY = "HTTP proxy"
HAPROXY = "HAProxy"  # Serve's direct ingress: Serve starts haproxy as a child of its proxy actor
OTHER = "rest of Ray"
POSTGRES = "PostgreSQL"


def _part(process: psutil.Process) -> str:
    try:
        title = " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return OTHER
    if os.path.basename(title.split(" ", 1)[0]) == "haproxy":
        return HAPROXY
    if title.startswith(PROXY_TITLE):
        return PROXY
    if title.startswith(REPLICA_TITLE):
        # ``<app>:<deployment>`` then ``.<method>`` while a call runs; deployment names hold no dots (builder.py).
        deployment = title.removeprefix(REPLICA_TITLE).split()[0].split(":")[-1].split(".")[0]
        return deployment.split("-")[0]  # Engine-<model> is the engine, whatever replaces it
    return OTHER


def pids_of(part: str) -> list[int]:
    """The processes among this process's descendants that are ``part`` (as ``sample`` names them)."""
    return [p.pid for p in psutil.Process(os.getpid()).children(recursive=True) if _part(p) == part]


def _cpu_s(process: psutil.Process) -> float:
    try:
        times = process.cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return 0.0
    return float(times.user + times.system)


@dataclass(frozen=True)
class CpuSample:
    by_pid: dict[int, tuple[str, float]]  # pid -> (part, CPU seconds so far)
    machine_busy_s: float
    machine_total_s: float


def postgres_root(database_url: str) -> int | None:
    """The pid of the PostgreSQL server listening on the URL's port (a server of our own: testkit/postgres.py starts it
    detached, so it is not among our children)."""
    port = database_url.rsplit(":", 1)[-1].split("/")[0]
    for process in psutil.process_iter(["name", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        if process.info["name"] == "postgres" and "-p" in cmdline and cmdline[cmdline.index("-p") + 1] == port:
            return int(process.pid)
    return None


def sample(postgres: int | None = None) -> CpuSample:
    """CPU so far of this process and its descendants (by part), of a PostgreSQL server's processes, and of the
    machine. A process a replica started (vLLM's engine core) counts for that replica."""
    me = psutil.Process(os.getpid())
    children = me.children(recursive=True)
    parent_of = {}
    named = {me.pid: CLIENT}
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            parent_of[child.pid] = child.ppid()
        part = _part(child)
        if part != OTHER:
            named[child.pid] = part
    by_pid = {me.pid: (CLIENT, _cpu_s(me))}
    for child in children:
        pid = child.pid
        while pid not in named and pid in parent_of and parent_of[pid] != me.pid:
            pid = parent_of[pid]
        by_pid[child.pid] = (named.get(pid, OTHER), _cpu_s(child))
    if postgres is not None:
        with contextlib.suppress(psutil.NoSuchProcess):
            server = psutil.Process(postgres)
            for process in [server, *server.children(recursive=True)]:
                by_pid[process.pid] = (POSTGRES, _cpu_s(process))
    machine = psutil.cpu_times()
    idle = machine.idle + getattr(machine, "iowait", 0.0)
    total = sum(machine)
    return CpuSample(by_pid, total - idle, total)


@dataclass(frozen=True)
class CpuUse:
    """CPU seconds each part used between two samples, the machine's busy share, and what ran outside our tree."""

    seconds_by_part: dict[str, float]
    machine_busy_share: float  # 0..1 of all cores
    outside_s: float  # CPU seconds of processes that are not ours (other work on a shared machine)

    @property
    def ours_s(self) -> float:
        return sum(self.seconds_by_part.values())


def between(before: CpuSample, after: CpuSample) -> CpuUse:
    parts: dict[str, float] = {}
    for pid, (part, seconds) in after.by_pid.items():
        earlier = before.by_pid.get(pid, (part, 0.0))[1]
        parts[part] = parts.get(part, 0.0) + max(0.0, seconds - earlier)
    busy_s = after.machine_busy_s - before.machine_busy_s
    total_s = after.machine_total_s - before.machine_total_s
    return CpuUse(
        seconds_by_part=dict(sorted(parts.items())),
        machine_busy_share=min(1.0, max(0.0, busy_s / total_s)) if total_s > 0 else 0.0,
        outside_s=max(0.0, busy_s - sum(parts.values())),
    )
