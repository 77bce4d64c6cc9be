"""The port picker of the local runtime, ``platform dev`` and the tests: ports that a bind to
port 0 or an outgoing connection can never take first."""

from __future__ import annotations

import collections
import socket
from pathlib import Path

import pytest

from platform_common import ports

linux_range = pytest.mark.skipif(
    not ports.EPHEMERAL_RANGE_FILE.exists(), reason="Linux's ephemeral port range"
)


@linux_range
def test_chosen_ports_are_bindable_distinct_and_below_the_kernels_choices() -> None:
    low, _ = ports.ephemeral_range()
    chosen = [ports.free_port() for _ in range(50)] + ports.free_ports(50)
    assert len(set(chosen)) == len(chosen)
    assert all(ports.LOWEST <= port < low for port in chosen)
    with socket.socket() as server:
        server.bind((ports.HOST, chosen[-1]))
        server.listen()
        # What the kernel gives a server that binds port 0 comes from its own range.
        with socket.socket() as other:
            other.bind((ports.HOST, 0))
            assert other.getsockname()[1] >= low


@linux_range
def test_a_recent_port_is_not_handed_out_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Even once it is free again: its process may not have bound it yet."""
    low, _ = ports.ephemeral_range()
    # A range of 205 ports (the least the picker works with) makes repeats likely.
    monkeypatch.setattr(ports, "LOWEST", low - ports.ATTEMPTS - 5)
    monkeypatch.setattr(ports, "_recent", collections.deque(maxlen=ports.RECENT))
    chosen = ports.free_ports(100) + [ports.free_port() for _ in range(60)]
    assert len(set(chosen)) == len(chosen)


def test_without_a_known_range_the_kernel_chooses(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE_FILE", tmp_path / "absent")
    assert ports.ephemeral_range() == (0, 0)
    chosen = ports.free_ports(5)
    assert len(set(chosen)) == 5
    for port in chosen:
        with socket.socket() as server:
            server.bind((ports.HOST, port))
    assert ports.free_ports(0) == []
