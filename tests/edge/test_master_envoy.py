"""``platform master --edge-envoy``: the master starts its Envoy, and never leaves it behind."""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest

from tests.edge.envoy_support import raw_request
from tests.support.master import MasterProcess
from tests.support.ports import free_port

pytestmark = pytest.mark.process


def _envoy_pid(master: MasterProcess) -> int:
    for line in master.log().splitlines():
        if '"edge serving"' in line or "edge serving" in line:
            return int(json.loads(line)["envoy_pid"])
    raise AssertionError(f"no 'edge serving' line in the log:\n{master.log()}")


def _gone(pid: int, within: float = 15.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGKILL"])
def test_the_local_envoy_serves_and_stops_with_the_master(tmp_path: Path, stop: str) -> None:
    edge_port = free_port()
    master = MasterProcess(
        tmp_path,
        f"sqlite+aiosqlite:///{tmp_path / 'platform.db'}",
        "--edge-listen",
        f"127.0.0.1:{edge_port}",
        "--edge-envoy",
        "--edge-admin-listen",
        "127.0.0.1:0",
        "--edge-envoy-dir",
        str(tmp_path / "envoy"),
    )
    master.start()
    try:
        pid = _envoy_pid(master)
        assert psutil.Process(pid).name() == "envoy"
        answer = raw_request(edge_port, "/challenges/nothing/")
        assert (answer.status, answer.json()) == (404, {"error": "not_found"})
        # The bootstrap holds the edge token: only the owner may read it.
        assert (tmp_path / "envoy" / "envoy.yaml").stat().st_mode & 0o777 == 0o600
        if stop == "SIGTERM":
            assert master.terminate() == 0
        else:
            master.kill()
        assert _gone(pid), f"Envoy {pid} outlived the master ({stop})"
    finally:
        master.kill()
