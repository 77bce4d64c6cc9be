"""Loopback ports for processes started here that bind them a little later.

A port picked by binding port 0 and closing the socket is free only for a moment: until the
child binds it, any other ``bind(port 0)`` (an Envoy admin API, a metrics endpoint, a gRPC
server on ``:0``) and any outgoing connection can be given the same port by the kernel, which
picks them all from its ephemeral range. So ports are chosen here from below that range,
where the kernel never picks one on its own; only another process that chooses fixed ports
could still take one first.
"""

from __future__ import annotations

import collections
import random
import socket
import threading
from pathlib import Path

HOST = "127.0.0.1"
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
# Chosen ports come from below the kernel's ephemeral range, and from no lower than this.
LOWEST = 10_000
ATTEMPTS = 200
# A port handed out is not handed out again before this many others.
RECENT = 4096

_lock = threading.Lock()
_recent: collections.deque[int] = collections.deque(maxlen=RECENT)


def free_port() -> int:
    """A loopback port that nothing listens on right now (see the module's docstring)."""
    (port,) = free_ports(1)
    return port


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that nothing listens on right now.

    From below the kernel's ephemeral range, and none of the last ``RECENT`` this process
    handed out. Where no such range is known (not Linux) or there is no room below it, the
    kernel chooses (port 0), with the race that implies.
    """
    if count <= 0:
        return []
    low, _ = ephemeral_range()
    if low - LOWEST < ATTEMPTS:
        return _kernel_ports(count)
    chosen: list[int] = []
    with _lock:
        for _ in range(count * ATTEMPTS):
            port = random.randrange(LOWEST, low)  # noqa: S311 - spreads picks, no secret
            if port not in _recent and port not in chosen and _bindable(port):
                chosen.append(port)
                if len(chosen) == count:
                    _recent.extend(chosen)
                    return chosen
    raise OSError(f"no {count} free loopback ports between {LOWEST} and {low}")


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for ports it picks, or ``(0, 0)`` where none is known."""
    try:
        low, high = EPHEMERAL_RANGE_FILE.read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 0, 0


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


def _kernel_ports(count: int) -> list[int]:
    # All held at once while picking, so none repeats.
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind((HOST, 0))
        return [int(probe.getsockname()[1]) for probe in probes]
    finally:
        for probe in probes:
            probe.close()
