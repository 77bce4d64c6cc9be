"""The test suite's port picker: ports a bind to port 0 can never take first."""

from __future__ import annotations

import socket

import pytest

from tests.support import ports


@pytest.mark.skipif(not ports.EPHEMERAL_RANGE_FILE.exists(), reason="Linux's port range")
def test_chosen_ports_are_bindable_distinct_and_below_the_kernels_choices() -> None:
    low, _ = ports._ephemeral_range()
    chosen = [ports.free_port() for _ in range(50)]
    assert len(set(chosen)) == len(chosen)
    assert all(ports.LOWEST <= port < low for port in chosen)
    with socket.socket() as server:
        server.bind(("127.0.0.1", chosen[-1]))
        server.listen()
        # What the kernel gives a server that binds port 0 comes from its own range.
        with socket.socket() as other:
            other.bind(("127.0.0.1", 0))
            assert other.getsockname()[1] >= low
