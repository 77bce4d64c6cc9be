"""The example registry spec is accepted as is, through grpcurl, in production mode too."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support.master import ADMIN_TOKEN, VENV_BIN, MasterProcess

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "registry" / "term-bench.json"

pytestmark = [pytest.mark.process, pytest.mark.postgres]


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_example_spec_creates_a_challenge_in_production_mode(
    database_url: str, tmp_path: Path
) -> None:
    master = MasterProcess(
        tmp_path, database_url, "--production", "--image-allowlist", "ghcr.io/example-org"
    )
    address = master.start()
    try:
        result = subprocess.run(
            [
                str(VENV_BIN / "grpcurl"),
                "-plaintext",
                "-H",
                f"authorization: Bearer {ADMIN_TOKEN}",
                "-d",
                "@",
                address,
                "platform_network.v1.Registry/CreateChallenge",
            ],
            stdin=EXAMPLE.open(),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env={**os.environ},
        )
    finally:
        master.stop()
    assert result.returncode == 0, result.stderr
    created = json.loads(result.stdout)
    spec = json.loads(EXAMPLE.read_text())["challenge"]
    assert created["challenge"]["slug"] == spec["slug"]
    assert created["challenge"]["routes"]["signed_path_prefixes"] == ["/submit"]
    assert created["token"].startswith("pct_")
