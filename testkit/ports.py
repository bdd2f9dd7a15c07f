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
