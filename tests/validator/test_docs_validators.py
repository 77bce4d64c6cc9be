"""docs/validators.md: its settings and metrics tables match the code, and its
``platform validator`` command runs as written (addresses and paths made private)
against a real master over the local simulated subnet.

The command needs the master to accept calls signed with a validator hotkey."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import signal
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import Counter, Gauge, Histogram

from platform_common.runtime.local import RECORD
from tests.helpers import ACTIVE, create, set_status
from tests.runtime.support import IMAGE_MAP, NATIVE, Runtimes, alive
from tests.support.master import VENV_BIN
from tests.support.ports import free_port
from tests.support.waiting import eventually
from tests.validator.support import VALIDATOR_KEY, master_hotkey, signer
from tests.validator.test_agent_master import Site, make_site, start_master
from validator import telemetry
from validator.agent import CLOSE_TIMEOUT_S
from validator.config import ValidatorConfig

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "validators.md"


def table(name: str) -> list[list[str]]:
    text = GUIDE.read_text()
    found = re.search(rf"<!-- {name} -->\n(.*?)<!-- /{name} -->", text, re.S)
    assert found, f"docs/validators.md has no {name} table"
    rows = [line for line in found.group(1).splitlines() if line.startswith("|")][2:]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def shown(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"`{value:g}`"
    if value == "":
        return "none"
    return f"`{value}`"


def test_the_settings_table_lists_every_setting_with_its_default() -> None:
    documented: dict[str, str] = {}
    for first, default, _ in table("settings"):
        names = re.findall(r"`(--[a-z-]+|PLATFORM_[A-Z_]+)`", first)
        assert names, first
        documented[names[0]] = default
    expected: dict[str, str] = {}
    for field in dataclasses.fields(ValidatorConfig):
        key = (
            f"--{field.name.replace('_', '-')}"
            if field.metadata.get("flag", True)
            else f"PLATFORM_{field.name.upper()}"
        )
        expected[key] = shown(field.default)
    for required in ("--master-hotkey", "--chain"):
        expected[required] = "required"
    assert documented == expected


def test_the_metrics_table_lists_every_metric() -> None:
    documented = {re.sub(r"\{.*", "", row[0].strip("`")) for row in table("metrics")}
    defined = set()
    for value in vars(telemetry).values():
        if isinstance(value, Counter | Gauge | Histogram):
            [metric] = value.describe()
            suffix = "_total" if isinstance(value, Counter) else ""
            defined.add(metric.name + suffix)
    assert documented == defined


def test_help_names_the_hotkey_variable() -> None:
    result = subprocess.run(
        [str(VENV_BIN / "platform"), "validator", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "PLATFORM_HOTKEY" in result.stdout
    assert "--master-hotkey" in result.stdout


def test_bad_settings_exit_2_naming_the_setting(tmp_path: Path) -> None:
    env = {**os.environ, "PLATFORM_HOTKEY": VALIDATOR_KEY}
    result = subprocess.run(
        [str(VENV_BIN / "platform"), "validator", "--chain", "local+file:x"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "--master-hotkey: required" in result.stderr


def launch_block(
    which: Callable[[str], bool], replacements: dict[str, str], cwd: Path, log: Path
) -> subprocess.Popen[bytes]:
    """Run the guide's one ``sh`` block that ``which`` picks, with ``replacements`` made
    (private addresses and paths) and the validator exec'd, so a signal reaches it."""
    blocks = re.findall(r"```sh\n(.*?)```", GUIDE.read_text(), re.S)
    [block] = [b for b in blocks if "platform validator" in b and which(b)]
    for old, new in {**replacements, "platform validator": "exec platform validator"}.items():
        assert old in block, f"{old!r} is not in the guide's command any more"
        block = block.replace(old, new)
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "MASTER_HOTKEY": master_hotkey(),
    }
    env.pop("PLATFORM_HOTKEY", None)
    with log.open("wb") as stderr:
        return subprocess.Popen(
            ["bash", "-c", block], env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=stderr
        )


def health(metrics: str) -> dict[str, Any]:
    """``/healthz`` of the agent at ``metrics`` (an empty dict while it does not answer 200)."""
    try:
        with urllib.request.urlopen(f"http://{metrics}/healthz", timeout=5) as response:
            body: dict[str, Any] = json.loads(response.read())
            return body
    except OSError:
        return {}


# The agent's stop is bounded: the grace (the guide's commands keep the default), then each
# of three resources (channel, chain, store) at most CLOSE_TIMEOUT_S; plus a margin.
STOP_TIMEOUT_S = ValidatorConfig().shutdown_grace + 3 * CLOSE_TIMEOUT_S + 15


async def stopped(proc: subprocess.Popen[bytes], log: Path) -> tuple[int, str]:
    """SIGTERM to the agent if it still runs; its exit status and log."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(proc.wait, STOP_TIMEOUT_S)
    return code, await asyncio.to_thread(log.read_text, errors="replace")


def private(site: Site, master: str, tmp_path: Path, metrics: str) -> dict[str, str]:
    """The guide's addresses and paths -> this test's."""
    return {
        "127.0.0.1:50051": master,
        "local+http://127.0.0.1:9945": site.subnet.url,
        ".dev/validator.db": str(tmp_path / "validator.db"),
        "127.0.0.1:9466": metrics,
    }


@pytest.mark.process
async def test_the_command_runs_as_written(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    site = await make_site("sqlite", request, tmp_path)
    master = await start_master(site)
    metrics = f"127.0.0.1:{free_port()}"
    log = tmp_path / "validator.log"
    proc = launch_block(
        lambda block: "--run-challenges" not in block,
        private(site, master.address, tmp_path, metrics),
        tmp_path,
        log,
    )
    try:
        sealed = (await master.seal()).vector
        hotkey = signer(VALIDATOR_KEY).ss58_address

        async def on_chain() -> bool:
            assert proc.poll() is None, "platform validator exited"
            row = await site.subnet.local.weights_set(hotkey)
            return row is not None and row.values == tuple(sealed.chain_weights.values)

        await eventually(on_chain, what="the vector on chain")

        async def submitted() -> dict[str, Any] | None:
            body = await asyncio.to_thread(health, metrics)
            return body if body["submitted_epoch"] == sealed.epoch else None

        body = await eventually(submitted, what="/healthz to show the submission")
        assert body["status"] == "ok"
    finally:
        code, stderr = await stopped(proc, log)
        await master.close()
    assert code == 0, stderr
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    messages = [line["msg"] for line in lines]
    assert "weights set on chain" in messages
    assert messages[-1] == "validator agent stopped"


@pytest.mark.process
async def test_the_run_challenges_command_runs_as_written(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    site = await make_site("sqlite", request, tmp_path)
    master = await start_master(site)
    await create(master.registry, "sum-bench", 0.5, image=f"{NATIVE}:1.0.0")
    await set_status(master.registry, "sum-bench", ACTIVE)
    runtime_dir = tmp_path / "validator-runtime"
    net = Runtimes(runtime_dir)
    metrics = f"127.0.0.1:{free_port()}"
    log = tmp_path / "validator.log"
    proc = launch_block(
        lambda block: "--run-challenges" in block,
        {
            **private(site, master.address, tmp_path, metrics),
            "examples/images.json": str(IMAGE_MAP),
            ".dev/validator-runtime": str(runtime_dir),
        },
        tmp_path,
        log,
    )
    pids: list[int] = []
    try:

        async def running() -> dict[str, Any] | None:
            assert proc.poll() is None, "platform validator exited"
            body = await asyncio.to_thread(health, metrics)
            state = body.get("challenges", {}).get("sum-bench", {}).get("state")
            return body if state == "RUNNING" else None

        await eventually(running, within=60, what="sum-bench RUNNING in /healthz")
        record = json.loads((runtime_dir / "challenges" / "sum-bench" / RECORD).read_text())
        pids = [int(entry["pid"]) for entry in record["processes"].values()]
        assert len(pids) == 2
        assert all(alive(pid) for pid in pids)
    finally:
        code, stderr = await stopped(proc, log)
        await master.close()
        await net.cleanup()
    assert code == 0, stderr
    assert not any(alive(pid) for pid in pids), "the agent stops its challenges when it stops"
