"""What the stack listens on: vLLM's internal ports (its engine core, its workers' distributed setup) and Ray's
dashboard and job API only on loopback; nothing of vLLM's is reachable from another machine.
"""

from __future__ import annotations

import json

import psutil
import pytest

from tests.conftest import Stack

pytestmark = pytest.mark.stack

LOOPBACK = {"127.0.0.1", "::1"}


def stack_processes(stack: Stack) -> list[psutil.Process]:
    """The Ray head `anker up` started and every process under it (Ray's, the replicas', vLLM's)."""
    state = json.loads((stack.data_dir / "run" / "state.json").read_text())
    head = psutil.Process(state["head_pid"])
    return [head, *head.children(recursive=True)]


def listening(processes: list[psutil.Process]) -> list[tuple[str, str, int]]:
    found = []
    for process in processes:
        try:
            name = process.name()
            sockets = process.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        found += [(name, s.laddr.ip, s.laddr.port) for s in sockets if s.status == psutil.CONN_LISTEN]
    return found


def test_vllm_and_the_ray_dashboard_listen_on_loopback_only(stack: Stack) -> None:
    processes = stack_processes(stack)
    vllm = [p for p in processes if p.name().startswith("VLLM::")]
    assert vllm, "no vLLM process found under the stack's Ray head"
    vllm_sockets = listening(vllm)
    assert vllm_sockets, "no listening socket of vLLM's was found to check"
    assert {ip for _, ip, _ in vllm_sockets} <= LOOPBACK, vllm_sockets

    dashboard_port = int(stack.env["ANKER__RAY__DASHBOARD_PORT"])
    dashboard = [(name, ip) for name, ip, port in listening(processes) if port == dashboard_port]
    assert dashboard and {ip for _, ip in dashboard} <= LOOPBACK, dashboard
