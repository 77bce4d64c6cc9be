"""docs/challenges.md: every ``sh`` block runs, in order, in one bash from the repository
root (with the fixed ports of the guide swapped for free ones), and every ``python``
block compiles."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from tests.shim.support import REPO
from tests.support.ports import free_port

GUIDE = REPO / "docs" / "challenges.md"
_BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)
_ADDRESS = re.compile(r"127\.0\.0\.1:(\d+)")

pytestmark = pytest.mark.process


def blocks(language: str) -> list[str]:
    return [m.group(2) for m in _BLOCK.finditer(GUIDE.read_text()) if m.group(1) == language]


def test_python_blocks_compile() -> None:
    found = blocks("python")
    assert len(found) >= 2
    for index, code in enumerate(found):
        compile(code, f"{GUIDE.name}:python-block-{index}", "exec")


def test_sh_blocks_run(tmp_path: Path) -> None:
    script = "\n".join(blocks("sh"))
    ports = {port: free_port() for port in sorted(set(_ADDRESS.findall(script)))}
    assert len(ports) >= 6, ports
    script = _ADDRESS.sub(lambda m: f"127.0.0.1:{ports[m.group(1)]}", script)
    script_path = tmp_path / "guide.sh"
    script_path.write_text("set -euo pipefail\n" + script)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLATFORM_")}
    # Everything the script starts stays in its process group, stopped below by its id.
    proc = subprocess.Popen(
        ["bash", str(script_path)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=90)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, f"stdout:\n{stdout}\nstderr:\n{stderr}"
    # The miners' points made it through both shims, and the metrics counted the calls.
    assert '"hotkey": "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"' in stdout
    assert '"hotkey": "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty"' in stdout
    assert '"scoring_version": "sum-v1"' in stdout
    assert '"status": "HEALTH_STATUS_SERVING"' in stdout
    assert 'platform_shim_challenge_calls_total{method="GetWeights",outcome="ok"} 1.0' in stdout
