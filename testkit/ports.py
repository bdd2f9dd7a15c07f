"""Free loopback ports for throwaway servers and test stacks."""

from __future__ import annotations

import socket


def free_port(taken: set[int] | None = None) -> int:
    """A TCP port free on 127.0.0.1 right now. With ``taken``, never one already in it, and it is added there:
    so that several ports picked before any is bound differ."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if taken is None:
            return port
        if port not in taken:
            taken.add(port)
            return port


def stack_ports() -> dict[str, str]:
    """The ports of a stack of its own, free on loopback now, as the environment overrides that set them: its API,
    its Ray cluster's, HAProxy's listeners and Serve's fallback proxy. Another stack on this host keeps its own."""
    names = (
        "ANKER_PORT",
        "ANKER__RAY__GCS_PORT",
        "ANKER__RAY__DASHBOARD_PORT",
        "ANKER__RAY__CLIENT_SERVER_PORT",
        "ANKER__RAY__DASHBOARD_AGENT_LISTEN_PORT",
        "ANKER__RAY__METRICS_EXPORT_PORT",
        "ANKER__SERVER__HAPROXY_METRICS_PORT",
        "ANKER__SERVER__HAPROXY_STATS_PORT",
        "ANKER__SERVER__FALLBACK_PROXY_PORT",
    )
    taken: set[int] = set()  # picked before any is bound: without it two names can get one port (seen: the GCS's
    # and HAProxy's stats port, and the whole stack failed to start)
    return {name: str(free_port(taken)) for name in names}
