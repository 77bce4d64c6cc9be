"""Loopback ports for the processes a test or benchmark starts."""

from __future__ import annotations

import random
import socket
from pathlib import Path

EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
# Chosen ports come from below the kernel's ephemeral range, and from no lower than this.
LOWEST = 10_000
ATTEMPTS = 200

_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on right now, for a process to bind a little later.

    It comes from below the kernel's ephemeral range, from which the kernel picks the port
    of every ``bind(("127.0.0.1", 0))`` and of every outgoing connection: a server that
    binds port 0 meanwhile (an Envoy's admin API, a metrics endpoint) or a client cannot
    take it first. This process never hands out the same port twice. Another process that
    chooses its ports the same way could still take it first.
    """
    low, _ = _ephemeral_range()
    if low - LOWEST < ATTEMPTS:  # no room below the ephemeral range: let the kernel choose
        return _kernel_port()
    for _ in range(ATTEMPTS):
        port = random.randrange(LOWEST, low)
        if port in _handed_out:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise OSError(f"no free loopback port between {LOWEST} and {low} after {ATTEMPTS} tries")


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = EPHEMERAL_RANGE_FILE.read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 0, 0  # not Linux: no range known


def _kernel_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
