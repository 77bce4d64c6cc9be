"""The benchmark commands docs/performance.md gives exist and accept the options it shows.

Each benchmark is started with its options plus ``--help``: argparse refuses an unknown
option before printing help, so a renamed or removed option fails here, without running
anything heavy.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "performance.md"
COMMAND = re.compile(r"^(?:\.venv/bin/)?python -m (bench\.\w+)((?: --[\w-]+(?: [\w.]+)?)*)", re.M)


def documented() -> list[tuple[str, list[str]]]:
    """Every ``python -m bench.X [options]`` in the guide, deduplicated."""
    found = {
        (module, tuple(options.split())) for module, options in COMMAND.findall(GUIDE.read_text())
    }
    return sorted((module, list(options)) for module, options in found)


def test_every_benchmark_is_documented() -> None:
    modules = {module for module, _ in documented()}
    on_disk = {
        f"bench.{p.stem}"
        for p in (REPO / "bench").glob("*.py")
        if p.stem not in ("__init__", "common", "challenge_farm")
    }
    assert on_disk <= modules, sorted(on_disk - modules)


@pytest.mark.parametrize(("module", "options"), documented(), ids=str)
def test_a_documented_command_is_accepted(module: str, options: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", module, *options, "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: ")
