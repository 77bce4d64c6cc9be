"""The commands of docs/miners.md and of the edge section of docs/operators.md, run as written.

A real master (in this process, with the edge on), a real Envoy it configures, and
the native example challenge registered as ``alpha`` with ``/submit`` signed. Every
``sh`` and ``python`` block of the miners' guide runs with ``EDGE``, ``MASTER`` and
``PLATFORM_MINER_HOTKEY`` set (a hotkey registered on the local subnet); the
operators' "Running Envoy on its own" block runs in a scratch directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from master.edge.proxy import EnvoyProcess, render_bootstrap
from platform_common.chain import LocalSubnet
from platform_common.chain.local import dev_keypair
from platform_network.v1 import registry_pb2
from tests.edge.envoy_support import raw_request
from tests.epochs.live import LiveChallenge, launch
from tests.helpers import ACTIVE, create, set_status
from tests.support.master import VENV_BIN, RunningMaster, start_master
from tests.support.ports import free_port

pytestmark = pytest.mark.process

REPO = Path(__file__).resolve().parents[2]
MINERS = REPO / "docs" / "miners.md"
OPERATORS = REPO / "docs" / "operators.md"
EDGE_TOKEN = "edge-token-for-docs-0123456789"
MINER_UID = 3
MINER_URI = f"//platform-dev/hotkey/{MINER_UID}"


def blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(), re.S)


@dataclass
class Site:
    env: dict[str, str]
    running: RunningMaster
    envoy: EnvoyProcess
    challenge: LiveChallenge
    edge_port: int

    async def run(self, argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(
            subprocess.run,
            argv,
            capture_output=True,
            text=True,
            env=self.env,
            cwd=cwd,
            timeout=60,
            check=False,
        )


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    subnet = tmp_path / "chain.json"
    LocalSubnet.create(subnet, netuid=1, neurons=8, validators=2, manual_blocks=True)
    edge_port, master_port = free_port(), free_port()
    placement = tmp_path / "placement.json"
    placement.write_text("{}")
    running = await start_master(
        f"sqlite+aiosqlite:///{tmp_path / 'platform.db'}",
        listen=f"127.0.0.1:{master_port}",
        chain=f"local+file:{subnet}",
        hotkey="//platform-test/master",
        epochs=False,
        edge_listen=f"127.0.0.1:{edge_port}",
        edge_token=EDGE_TOKEN,
        shim_endpoints_file=str(placement),
    )
    envoy = EnvoyProcess(
        render_bootstrap(
            node_id="docs-edge",
            admin_host="127.0.0.1",
            admin_port=0,
            xds_host="127.0.0.1",
            xds_port=master_port,
            edge_token=EDGE_TOKEN,
        ),
        work_dir=tmp_path / "envoy",
        log_level="warning",
    )
    challenge: LiveChallenge | None = None
    try:
        await envoy.start()
        await envoy.wait_ready(timeout=30)
        created = await create(
            running.registry,
            "alpha",
            0.5,
            routes=registry_pb2.PublicRoutes(public_port=80, signed_path_prefixes=["/submit"]),
        )
        challenge = launch(tmp_path, "alpha", created.token, with_shim=False)
        public = challenge.public_url.removeprefix("http://")
        placement.write_text(json.dumps({"alpha": {"public": public}}))
        await set_status(running.registry, "alpha", ACTIVE)
        deadline = time.monotonic() + 15
        while (
            await asyncio.to_thread(raw_request, edge_port, "/challenges/alpha/task?id=1")
        ).status != 200:
            assert time.monotonic() < deadline, "the edge never routed alpha"
            await asyncio.sleep(0.05)
        env = {
            **os.environ,
            "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
            "EDGE": f"http://127.0.0.1:{edge_port}",
            "MASTER": running.address,
            "PLATFORM_MINER_HOTKEY": MINER_URI,
        }
        yield Site(env, running, envoy, challenge, edge_port)
    finally:
        await envoy.stop()
        if challenge is not None:
            challenge.stop()
        await running.close()


async def test_the_miners_guide_works_as_written(site: Site, tmp_path: Path) -> None:
    shell = blocks(MINERS, "sh")
    assert len(shell) == 3
    catalogue, task, submit = [await site.run(["bash", "-c", b], tmp_path) for b in shell]
    assert catalogue.returncode == 0, catalogue.stderr
    assert '"public_path": "/challenges/alpha/"' in catalogue.stdout
    assert '"/submit"' in catalogue.stdout
    assert task.returncode == 0, task.stderr
    assert json.loads(task.stdout)["task_id"] == 3
    assert submit.returncode == 0, submit.stderr
    assert json.loads(submit.stdout)["correct"] is False

    [python] = blocks(MINERS, "python")
    script = tmp_path / "sign.py"
    script.write_text(python)
    solved = await site.run([sys.executable, str(script)], tmp_path)
    assert solved.returncode == 0, solved.stderr
    status, answer = solved.stdout.split(" ", 1)
    assert status == "200"
    assert json.loads(answer) == {"correct": True, "score": 1.0}

    # The challenge credited the hotkey the edge verified, nothing else.
    board = raw_request(site.edge_port, "/challenges/alpha/leaderboard")
    assert board.status == 200
    assert board.json() == [{"hotkey": dev_keypair("hotkey", MINER_UID).ss58_address, "score": 1.0}]


async def test_the_miner_command_reports_refusals(site: Site, tmp_path: Path) -> None:
    unsigned = await site.run(
        [
            "platform",
            "miner",
            "POST",
            f"{site.env['EDGE']}/challenges/alpha/submit",
            "--data",
            "{}",
            "--unsigned",
            "--include",
        ],
        tmp_path,
    )
    assert unsigned.returncode == 1
    assert unsigned.stdout.startswith("HTTP 401")
    assert "x-platform-auth-error: missing_signature" in unsigned.stdout.lower()
    stranger = dict(site.env, PLATFORM_MINER_HOTKEY="//not-on-this-subnet")
    refused = await asyncio.to_thread(
        subprocess.run,
        [
            "platform",
            "miner",
            "POST",
            f"{site.env['EDGE']}/challenges/alpha/submit",
            "--data",
            "{}",
        ],
        capture_output=True,
        text=True,
        env=stranger,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 1
    assert json.loads(refused.stdout)["reason"] == "not_registered"


async def test_the_operators_bootstrap_commands_work(site: Site, tmp_path: Path) -> None:
    text = OPERATORS.read_text()
    section = text[text.index("### Running Envoy on its own") :]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None
    assert "platform edge bootstrap" in block.group(1)
    (tmp_path / "edge-token").write_text(EDGE_TOKEN + "\n")
    result = await site.run(["bash", "-c", "set -e\n" + block.group(1)], tmp_path)
    assert result.returncode == 0, result.stderr
    rendered = (tmp_path / "edge.yaml").read_text()
    assert f"Bearer {EDGE_TOKEN}" in rendered
    assert 'id: "edge-1"' in rendered
    overload = yaml.safe_load(rendered)["overload_manager"]
    monitors = {m["name"]: m["typed_config"] for m in overload["resource_monitors"]}
    connections = monitors["envoy.resource_monitors.global_downstream_max_connections"]
    assert connections["max_active_downstream_connections"] == 20000
    assert monitors["envoy.resource_monitors.fixed_heap"]["max_heap_size_bytes"] == 536870912
