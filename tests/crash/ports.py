"""A free TCP port from this suite's range (29590-29609), for the MASTER_PORT of the workers launched here."""

from __future__ import annotations

import socket

PORTS = range(29590, 29610)


def free_port(used=()) -> int:
    """The first port of ``PORTS`` not in ``used`` that can be bound now (another run may hold the others)."""
    for port in PORTS:
        if port in used:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {PORTS.start}-{PORTS.stop - 1}")
