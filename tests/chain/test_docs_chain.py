"""The command line of docs/chain.md, run as written (state path and port made private)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.master import VENV_BIN
from tests.support.ports import free_port

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "chain.md"


@pytest.mark.process
def test_the_platform_chain_example_serves_the_subnet(tmp_path: Path) -> None:
    blocks = re.findall(r"```sh\n(.*?)```", GUIDE.read_text(), re.S)
    commands = [b for b in blocks if "platform chain" in b]
    assert len(commands) == 1, "docs/chain.md should show one `platform chain` command"
    port = free_port()
    state = tmp_path / "chain.json"
    command = (
        commands[0]
        .replace(".dev/chain.json", str(state))
        .replace("127.0.0.1:9945", f"127.0.0.1:{port}")
    )
    assert str(state) in command, command
    assert f"127.0.0.1:{port}" in command, command
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(
        ["bash", "-c", "exec " + command.strip().replace("\\\n", " ")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=2) as r:
                    health = json.loads(r.read())
                    break
            except OSError:
                assert time.monotonic() < deadline, "platform chain did not answer /v1/health"
                time.sleep(0.1)
        assert health["netuid"] == 1, health
        assert health["head"] >= 0, health
        assert state.exists()
        document = json.loads(state.read_text())
        assert document["netuid"] == 1
        assert document["max_uids"] == 32
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=15)
    assert code == 0
