"""Whether something listens on a local TCP port, for the tests that start or stop servers."""

from __future__ import annotations

import socket


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """True when a connection to host:port is accepted within half a second."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0
