"""The real ``platform master`` process: restarts after SIGKILL, graceful SIGTERM, CLI."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from platform_network.v1 import registry_pb2, registry_pb2_grpc
from tests.conftest import fresh_database
from tests.helpers import ACTIVE, create, set_status
from tests.registry.test_watch import take, watch
from tests.support import metrics
from tests.support.master import ADMIN, ADMIN_TOKEN, VENV_BIN, MasterProcess
from tests.support.ports import free_port

pytestmark = pytest.mark.process


async def test_watcher_misses_nothing_across_sigkill_restart(
    database_url: str, tmp_path: Path
) -> None:
    first = MasterProcess(tmp_path / "m1", database_url)
    address = first.start()
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = registry_pb2_grpc.RegistryStub(channel)
            await create(stub, "alpha", 0.3)
            live = watch(stub)
            [snapshot] = await take(live, 1)
            await create(stub, "beta", 0.2)
            [seen] = await take(live, 1)
            cursor = seen.cursor
            assert seen.event.revision == 2
            # Written after the watcher's last message, then the master dies hard.
            await set_status(stub, "alpha", ACTIVE)
            await create(stub, "gamma", 0.1)
            first.kill()
            # The open stream may still hold events 3 and 4; after them it must fail.
            with pytest.raises(grpc.aio.AioRpcError) as lost:
                await take(live, 5)
            assert lost.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        first.kill()

    second = MasterProcess(tmp_path / "m2", database_url)
    address = second.start()
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = registry_pb2_grpc.RegistryStub(channel)
            resumed = watch(stub, cursor.revision, cursor.history_id)
            missed = await take(resumed, 2)
            assert [m.event.revision for m in missed] == [3, 4]
            assert [m.event.challenge.slug for m in missed] == ["alpha", "gamma"]
            assert missed[0].event.challenge.status == ACTIVE
            # Same history, new process.
            assert missed[0].cursor.history_id == snapshot.cursor.history_id
            assert missed[0].cursor.server_epoch != snapshot.cursor.server_epoch
            await create(stub, "delta", 0.1)
            [live_event] = await take(resumed, 1)
            resumed.cancel()
            assert live_event.event.revision == 5
    finally:
        second.stop()


async def test_sigterm_turns_health_off_and_ends_streams_cleanly(tmp_path: Path) -> None:
    proc = MasterProcess(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
    address = proc.start()
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            health_watch = health.Watch(
                health_pb2.HealthCheckRequest(service="platform_network.v1.Registry")
            )
            first = await asyncio.wait_for(health_watch.read(), 5)
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            stub = registry_pb2_grpc.RegistryStub(channel)
            stream = watch(stub)
            await take(stream, 1)

            assert proc.proc is not None
            proc.proc.terminate()
            second = await asyncio.wait_for(health_watch.read(), 5)
            assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as health_ended:
                await asyncio.wait_for(health_watch.read(), 5)
            assert health_ended.value.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await take(stream, 1)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in (ended.value.details() or "")
        assert proc.terminate() == 0
        log = proc.log()
        assert "master stopped" in log
        # Logs are one JSON object per line.
        records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
        assert {"ts", "level", "msg", "component"} <= records[0].keys()
    finally:
        proc.stop()


async def test_metrics_endpoint_serves_prometheus_text(tmp_path: Path) -> None:
    proc = MasterProcess(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
    address = proc.start()
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            await create(registry_pb2_grpc.RegistryStub(channel), "alpha")
        record = next(
            json.loads(line) for line in proc.log().splitlines() if "master serving" in line
        )
        url = f"http://127.0.0.1:{record['metrics_port']}/metrics"
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
        text = body.decode()
        assert (
            'platform_grpc_requests_total{code="OK",'
            'method="/platform_network.v1.Registry/CreateChallenge"} 1.0' in text
        )
        assert "platform_registry_revision 1.0" in text
    finally:
        proc.stop()


LIST = "/platform_network.v1.Registry/ListChallenges"


def served(proc: MasterProcess, method: str) -> float:
    """How many calls of ``method`` the master process answered OK (its metrics)."""
    record = next(json.loads(line) for line in proc.log().splitlines() if "master serving" in line)
    return metrics.value(
        record["metrics_port"], "platform_grpc_requests_total", code="OK", method=method
    )


async def list_on_new_connections(address: str, connections: int) -> None:
    """One ListChallenges on each of ``connections`` connections of their own."""
    for _ in range(connections):
        # A channel of its own subchannel pool opens its own connection.
        options = [("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.insecure_channel(address, options=options) as channel:
            stub = registry_pb2_grpc.RegistryStub(channel)
            await stub.ListChallenges(registry_pb2.ListChallengesRequest(), metadata=ADMIN)


async def test_a_second_master_on_a_port_in_use_is_refused(tmp_path: Path) -> None:
    first = MasterProcess(tmp_path / "m1", f"sqlite+aiosqlite:///{tmp_path / 'm1.db'}")
    address = first.start()
    second = MasterProcess(tmp_path / "m2", f"sqlite+aiosqlite:///{tmp_path / 'm2.db'}")
    try:
        with pytest.raises(RuntimeError, match="master exited with 1"):
            second.start(address)
        errors = [json.loads(line) for line in second.log().splitlines() if line.startswith("{")]
        assert errors[-1]["level"] == "error"
        assert f"--listen: cannot listen on {address}: the port is in use" in errors[-1]["msg"]
        # The first master still answers every connection.
        await list_on_new_connections(address, 8)
        assert await asyncio.to_thread(served, first, LIST) == 8
    finally:
        second.stop()
        first.stop()


@pytest.mark.postgres
async def test_masters_with_reuse_port_share_one_port(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = await fresh_database("postgresql", request, tmp_path)
    first = MasterProcess(tmp_path / "m1", url, "--reuse-port")
    second = MasterProcess(tmp_path / "m2", url, "--reuse-port")
    try:
        address = first.start()
        assert second.start(address) == address
        await list_on_new_connections(address, 24)
        counts = [await asyncio.to_thread(served, proc, LIST) for proc in (first, second)]
        # The kernel spreads connections by a hash: both get some (all 24 going to
        # one of two has a chance of about 1 in 8 million).
        assert sum(counts) == 24
        assert min(counts) > 0, counts
    finally:
        second.stop()
        first.stop()


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "platform"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": str(VENV_BIN), **(env or {})},
        check=False,
    )


def test_help_documents_every_master_setting() -> None:
    import dataclasses

    from master.config import MasterConfig

    result = run_cli("master", "--help")
    assert result.returncode == 0
    for field in dataclasses.fields(MasterConfig):
        env = "PLATFORM_" + field.name.upper()
        assert env in result.stdout, f"{env} missing from --help"
        if field.metadata.get("flag", True):
            assert "--" + field.name.replace("_", "-") in result.stdout


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ["--production", "--image-allowlist", "ghcr.io/x"],
            {"PLATFORM_ADMIN_TOKEN": ADMIN_TOKEN},
            "production mode refuses SQLite",
        ),
        ([], {}, "no admin token"),
        ([], {"PLATFORM_ADMIN_TOKEN": "short"}, "must be at least 16 characters"),
        (
            ["--listen", "nope"],
            {"PLATFORM_ADMIN_TOKEN": ADMIN_TOKEN},
            "--listen: expected HOST:PORT",
        ),
        (
            ["--database-url", "mysql://x/y"],
            {"PLATFORM_ADMIN_TOKEN": ADMIN_TOKEN},
            "unsupported driver",
        ),
        (
            [],
            {"PLATFORM_ADMIN_TOKEN": ADMIN_TOKEN, "PLATFORM_SHUTDOWN_GRACE": "soon"},
            "PLATFORM_SHUTDOWN_GRACE",
        ),
        (
            ["--production", "--database-url", "postgresql+asyncpg://u@127.0.0.1:1/p"],
            {"PLATFORM_ADMIN_TOKEN": ADMIN_TOKEN},
            "--image-allowlist",
        ),
    ],
)
def test_master_refuses_bad_settings_with_a_clear_message(
    args: list[str], env: dict[str, str], message: str
) -> None:
    result = run_cli("master", *args, env=env)
    assert result.returncode == 2
    assert message in result.stderr


def test_db_upgrade_and_current(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"
    before = run_cli("db", "current", "--database-url", url)
    assert "database: (empty)" in before.stdout
    upgraded = run_cli("db", "upgrade", "--database-url", url)
    assert upgraded.returncode == 0, upgraded.stderr
    assert "database: 0004_epoch_tempos  release: 0004_epoch_tempos" in upgraded.stdout


@pytest.mark.parametrize(
    ("url", "args", "message"),
    [
        ("sqlite+aiosqlite:///{tmp}/m.db", ["--no-migrate"], "run `platform db upgrade`"),
        ("postgresql+asyncpg://u@127.0.0.1:9/none", [], "cannot use the database"),
    ],
)
def test_master_start_failures_are_one_clear_log_line(
    tmp_path: Path, url: str, args: list[str], message: str
) -> None:
    proc = MasterProcess(tmp_path, url.format(tmp=tmp_path), *args)
    with pytest.raises(RuntimeError, match="master exited with 1"):
        proc.start()
    proc.stop()
    errors = [json.loads(line) for line in proc.log().splitlines() if line.startswith("{")]
    assert errors[-1]["level"] == "error"
    assert message in errors[-1]["msg"]
    assert "Traceback" not in proc.log()


def test_console_script_is_the_venv_one() -> None:
    assert Path(sys.executable).parent == VENV_BIN
    assert (VENV_BIN / "grpcurl").exists()


_ = registry_pb2, ADMIN


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--max-connections", "0"), ("--max-heap-bytes", str(64 * 1024 * 1024 - 1))],
)
def test_edge_bootstrap_refuses_limits_naming_the_flag(flag: str, value: str) -> None:
    result = run_cli(
        "edge", "bootstrap", "--xds", "127.0.0.1:50051", "--node-id", "edge-1", flag, value,
        env={"PLATFORM_EDGE_TOKEN": "edge-token-0123456789"},
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(
        f"platform edge bootstrap: {flag}: must be an integer of at least"
    ), result.stderr


def test_edge_bootstrap_writes_a_private_file_with_output(tmp_path: Path) -> None:
    args = ("edge", "bootstrap", "--xds", "127.0.0.1:50051", "--node-id", "edge-1")
    env = {"PLATFORM_EDGE_TOKEN": "edge-token-0123456789"}
    printed = run_cli(*args, env=env)
    assert printed.returncode == 0, printed.stderr
    target = tmp_path / "bootstrap.yaml"
    target.write_text("an older, world-readable file")
    target.chmod(0o644)
    written = run_cli(*args, "--output", str(target), env=env)
    assert written.returncode == 0, written.stderr
    assert written.stdout == ""
    assert target.read_text() == printed.stdout
    assert target.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--min-seconds", "10", "--timeout", "5"], "--min-seconds: must be between 0 and"),
        (["--timeout", "0"], "--timeout: must be more than 0"),
        (["--admin", "nowhere"], "--admin"),
    ],
    ids=["wait-past-timeout", "no-timeout", "bad-admin"],
)
def test_edge_drain_refuses_bad_flags_naming_them(args: list[str], message: str) -> None:
    result = run_cli("edge", "drain", *args)
    assert result.returncode == 2
    assert result.stderr.startswith(f"platform edge drain: {message}"), result.stderr


def test_edge_drain_without_envoy_fails_saying_so() -> None:
    admin = f"127.0.0.1:{free_port()}"
    result = run_cli("edge", "drain", "--admin", admin, "--min-seconds", "0", "--timeout", "1")
    assert result.returncode == 1
    assert "platform edge drain: Envoy's admin API at http://127.0.0.1:" in result.stderr
    assert "unreachable" in result.stderr
