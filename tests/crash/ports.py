"""A free TCP port for the MASTER_PORT of launched workers; each test module may keep its own range."""

from __future__ import annotations

import socket

PORTS = range(29590, 29610)


def free_port(used=(), ports: range = PORTS) -> int:
    """The first port of ``ports`` not in ``used`` that can be bound now (another run may hold the others)."""
    for port in ports:
        if port in used:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {ports.start}-{ports.stop - 1}")
