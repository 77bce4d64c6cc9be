"""``platform master --edge-envoy``: the master starts its Envoy, and never leaves it behind."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.edge.envoy_support import raw_request
from tests.support.master import MasterProcess
from tests.support.ports import free_port

pytestmark = pytest.mark.process


def _log_entry(master: MasterProcess, message: str) -> dict[str, Any]:
    """The master's first log entry with ``message``."""
    for line in master.log().splitlines():
        if f'"{message}"' in line:
            entry: dict[str, Any] = json.loads(line)
            return entry
    raise AssertionError(f"no {message!r} line in the log:\n{master.log()}")


def _envoy_pid(master: MasterProcess) -> int:
    return int(_log_entry(master, "edge serving")["envoy_pid"])


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


def test_the_local_envoy_takes_the_masters_limits(tmp_path: Path) -> None:
    """--edge-max-connections and --edge-max-heap-bytes reach the overload manager of the
    Envoy the master runs (read back from Envoy's own config dump)."""
    master = MasterProcess(
        tmp_path,
        f"sqlite+aiosqlite:///{tmp_path / 'platform.db'}",
        "--edge-listen",
        f"127.0.0.1:{free_port()}",
        "--edge-envoy",
        "--edge-admin-listen",
        "127.0.0.1:0",
        "--edge-max-connections",
        "1234",
        "--edge-max-heap-bytes",
        str(100 * 1024 * 1024),
    )
    master.start()
    try:
        admin = _log_entry(master, "edge serving")["admin"]
        with urllib.request.urlopen(f"http://{admin}/config_dump") as answer:
            configs = json.load(answer)["configs"]
        (dump,) = [c for c in configs if c["@type"].endswith(".BootstrapConfigDump")]
        overload = dump["bootstrap"]["overload_manager"]
        monitors = {m["name"]: m["typed_config"] for m in overload["resource_monitors"]}
        connections = monitors["envoy.resource_monitors.global_downstream_max_connections"]
        assert connections["max_active_downstream_connections"] == "1234"
        heap = monitors["envoy.resource_monitors.fixed_heap"]
        assert heap["max_heap_size_bytes"] == str(100 * 1024 * 1024)
        assert master.terminate() == 0
    finally:
        master.kill()
