"""process_cpu's attribution of a process to a part, by its command line."""

from __future__ import annotations

from typing import Any

from loadtests.process_cpu import HAPROXY, OTHER, PROXY, _part


class _Process:
    def __init__(self, *argv: str) -> None:
        self._argv = list(argv)

    def cmdline(self) -> list[str]:
        return self._argv


def part(*argv: str) -> str:
    process: Any = _Process(*argv)
    return _part(process)


def test_parts_by_command_line() -> None:
    assert part("/usr/sbin/haproxy", "-f", "/tmp/haproxy.cfg") == HAPROXY
    assert part("haproxy", "-W") == HAPROXY
    assert part("ray::ProxyActor") == PROXY
    assert part("ray::ServeReplica:anker-tiny:Engine-tiny.__call__") == "Engine"
    assert part("python", "haproxy_helper.py") == OTHER
