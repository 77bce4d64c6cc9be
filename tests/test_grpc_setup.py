"""gRPC core's start-up switches: the ``platform`` processes run with them, an operator's
own ``GRPC_EXPERIMENTS`` wins, and they cannot be applied once gRPC is loaded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from platform_common import grpc_setup
from tests.shim.support import shim

# gRPC core's TCP trace names the source file of the endpoint that moved the bytes:
# iomgr's (the poller the switches select) or EventEngine's (gRPC's default).
POLLER_ENDPOINT = "tcp_posix.cc"
EVENT_ENGINE_ENDPOINT = "posix_endpoint.cc"


def test_the_switches_are_set_where_nothing_is() -> None:
    """In a fresh interpreter (grpc not loaded yet) with no GRPC_EXPERIMENTS."""
    environ = {k: v for k, v in os.environ.items() if k != grpc_setup.ENV}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os; from platform_common import grpc_setup; "
            f"print(grpc_setup.apply(), os.environ[{grpc_setup.ENV!r}])",
        ],
        env=environ,
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.split() == ["True", grpc_setup.EXPERIMENTS]


@pytest.mark.parametrize("own", ["", "-event_engine_client"])
def test_an_operators_own_value_wins(monkeypatch: pytest.MonkeyPatch, own: str) -> None:
    monkeypatch.setenv(grpc_setup.ENV, own)
    assert grpc_setup.apply() is False
    assert os.environ[grpc_setup.ENV] == own


def test_the_process_environment_is_left_alone_once_grpc_is_loaded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert "grpc" in sys.modules
    monkeypatch.delenv(grpc_setup.ENV, raising=False)
    assert grpc_setup.apply() is False
    assert grpc_setup.ENV not in os.environ


@pytest.mark.parametrize(
    ("own", "poller"),
    [(None, True), ("", False)],
    ids=["platform switches", "operator keeps gRPC defaults"],
)
async def test_platform_shim_starts_grpc_with_the_switches(
    tmp_path: Path, own: str | None, poller: bool
) -> None:
    """A real ``platform shim`` started without GRPC_EXPERIMENTS (None removes it from the
    inherited environment) moves its bytes on gRPC's poller; with the operator's empty
    value, on EventEngine."""
    front = shim(
        tmp_path,
        "127.0.0.1:9",
        "--log-level",
        "warning",
        env={grpc_setup.ENV: own, "GRPC_TRACE": "tcp", "GRPC_VERBOSITY": "debug"},
    )
    listen = front.start()["listen"]
    try:
        async with grpc.aio.insecure_channel(listen) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
    finally:
        front.stop()
    log = front.log()
    assert (POLLER_ENDPOINT in log) is poller
    assert (EVENT_ENGINE_ENDPOINT in log) is not poller


def test_the_operators_guide_gives_the_switches_and_the_override_this_file_runs() -> None:
    """docs/operators.md states the value the code sets, and its override example is the
    empty value the last test runs a real process with."""
    guide = (Path(__file__).resolve().parents[1] / "docs" / "operators.md").read_text()
    assert f"`{grpc_setup.ENV}={grpc_setup.EXPERIMENTS}`" in guide
    assert f"\n{grpc_setup.ENV}= platform master --config " in guide
