"""The built wheel carries the files an installed platform reads besides its modules.

Built from a copy of the source tree (so the checkout is left untouched), unpacked into an
empty directory (a wheel is a zip: unpacking is what installing does with its files), and
used from a separate interpreter that imports the platform from there and not from the
checkout.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOT_SOURCE = shutil.ignore_patterns(
    ".venv", ".git", ".tmp", ".dev", "build", "dist", "*.egg-info", "__pycache__", ".*_cache",
    ".hypothesis",
)  # fmt: skip

pytestmark = pytest.mark.process


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(REPO, source, symlinks=True, ignore=NOT_SOURCE)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*pip_wheel, "-q", "-w", str(work / "dist"), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = (work / "dist").glob("*.whl")
    return built


def test_the_wheel_ships_the_envoy_bootstrap_as_a_file(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        shipped = archive.read("master/edge/bootstrap.yaml")
        info = archive.getinfo("master/edge/bootstrap.yaml")
    assert shipped == (REPO / "envoy" / "bootstrap.yaml").read_bytes()
    # A regular file, not the source tree's symbolic link (mode bits in external_attr).
    assert (info.external_attr >> 16) & 0o170000 in (0, 0o100000)


def test_an_installed_master_renders_the_bootstrap_without_a_checkout(
    wheel: Path, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    script = textwrap.dedent(
        """
        from master.edge import proxy
        print(proxy.__file__)
        print(proxy.render_bootstrap(node_id="n", admin_host="127.0.0.1", admin_port=0,
                                     xds_host="127.0.0.1", xds_port=50051, edge_token="t"))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    module_file, rendered = done.stdout.split("\n", 1)
    assert Path(module_file).is_relative_to(site)
    assert 'id: "n"' in rendered
    assert 'value: "Bearer t"' in rendered
    assert 'socket_address: { address: "127.0.0.1", port_value: 50051 }' in rendered
