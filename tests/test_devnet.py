"""``platform dev`` (what ``make dev`` runs): starts, prints working commands, stops cleanly."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from platform_common import devnet
from platform_common.runtime.local import RECORD
from tests.support.devnet import (
    dev_env,
    launch,
    left_behind,
    read_until,
    run_shell,
    running_from,
)
from tests.support.master import VENV_BIN
from tests.support.waiting import eventually

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.process


def test_dev_prints_commands_that_work_and_stops_everything(tmp_path: Path) -> None:
    env = dev_env()
    # Every port 0: the banner says which ones were taken.
    proc = launch(tmp_path, tmp_path / "state", 0, validators=1)
    seen: list[str] = []
    try:
        # Chain, master, challenges, edge and validators first: generous on a busy machine.
        read_until(proc, r"Registry changes, sealed epochs and submissions appear below", seen, 180)
        banner = "".join(seen)
        address = re.search(r"master\s+(127\.0\.0\.1:\d+)", banner)
        assert address is not None
        assert re.search(r"metrics\s+http://127\.0\.0\.1:[1-9]\d*/metrics", banner)
        edge = re.search(r"edge\s+http://127\.0\.0\.1:([1-9]\d*)/challenges/\{slug\}/", banner)
        assert edge is not None
        edge_port = int(edge.group(1))
        assert re.search(r"chain\s+http://127\.0\.0\.1:\d+", banner)
        assert re.search(r"validators\s+1 agents", banner)
        # The edge is a real Envoy configured by the master: unknown slugs are 404.
        status, body = _http_get(f"http://127.0.0.1:{edge_port}/challenges/nothing/")
        assert (status, body) == (404, b'{"error":"not_found"}\n')
        # Run the printed commands exactly as printed, one shell for all.
        script = "set -e\n" + _printed(banner, "export PLATFORM_ADMIN_TOKEN")
        result = run_shell(script, env, tmp_path)
        assert "platform_network.v1.Registry" in result.stdout
        assert '"token": "pct_' in result.stdout
        # The live view shows the change the printed command made (after the examples'
        # four: created and activated).
        read_until(proc, r"revision 5: demo now DRAFT, share 0\.1", seen)
        # The miner commands work as printed: through the edge, the signed one too.
        result = run_shell("set -e\n" + _printed(banner, "curl -s"), env, tmp_path)
        decoder = json.JSONDecoder()
        task, end = decoder.raw_decode(result.stdout)
        submitted, _ = decoder.raw_decode(result.stdout[end:].lstrip())
        assert task["task_id"] == 1
        assert submitted["correct"] is False
        # Epochs are sealed over the two examples, and the validator puts them on chain.
        read_until(proc, r"epoch \d+ sealed: http (OK|EMPTY).*; native (OK|EMPTY)", seen, 90)
        read_until(proc, r"epoch \d+: validator \S+ submitted", seen, 90)
        # The README's commands after `make dev` work too (its fixed port, state
        # folder and venv path mapped onto this run's).
        readme = (ROOT / "README.md").read_text()
        [block] = [b for b in re.findall(r"```sh\n(.*?)```", readme, re.S) if "grpcurl" in b]
        script = (
            block.replace("127.0.0.1:50051", address.group(1))
            .replace(".dev/", f"{tmp_path / 'state'}/")
            .replace(".venv/bin/", f"{VENV_BIN}/")
        )
        result = run_shell("set -e\n" + script, env, tmp_path)
        assert "platform_network.v1.Registry" in result.stdout
        assert '"slug": "demo"' in result.stdout
        # And the README's miner commands, through this run's edge.
        [block] = [b for b in re.findall(r"```sh\n(.*?)```", readme, re.S) if "miner" in b]
        script = block.replace("127.0.0.1:8080", f"127.0.0.1:{edge_port}").replace(
            ".venv/bin/", f"{VENV_BIN}/"
        )
        result = run_shell("set -e\n" + script, env, tmp_path)
        assert json.loads(result.stdout) == {"correct": True, "score": 1.0}
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "Stopped." in out
    # The master and the Envoy it started are gone: their ports refuse connections.
    host, port = address.group(1).split(":")
    for gone in (int(port), edge_port):
        with socket.socket() as sock:
            sock.settimeout(2)
            with pytest.raises(ConnectionRefusedError):
                sock.connect((host, gone))
    # And nothing it started is left: no process runs from its state directory.
    assert left_behind(tmp_path / "state") == []


def _printed(banner: str, first: str) -> str:
    """The block of commands the banner prints starting with the line ``first``."""
    block = banner[banner.index(first) :].split("\n\n", maxsplit=1)[0].replace("\\\n", " ")
    return "\n".join(line.strip() for line in block.splitlines())


def _http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.mark.parametrize(
    ("signum", "ignoring_sigint"),
    [(signal.SIGTERM, False), (signal.SIGHUP, False), (signal.SIGINT, True)],
    ids=["SIGTERM", "SIGHUP", "SIGINT in a background job"],
)
def test_dev_stops_everything_on_a_stop_signal(
    tmp_path: Path, signum: signal.Signals, ignoring_sigint: bool
) -> None:
    """``kill``, a closed terminal, and Ctrl-C sent to a script's background job (which the
    shell started with SIGINT ignored) each stop the whole local subnet, as Ctrl-C does in
    a terminal: nothing it started is left running."""
    state = tmp_path / "state"
    proc = launch(tmp_path, state, 0, validators=1, ignoring_sigint=ignoring_sigint)
    seen: list[str] = []
    try:
        read_until(proc, r"Registry changes, sealed epochs and submissions appear below", seen, 180)
        started = [p.info["cmdline"][:3] for p in running_from(state)]
        for role in ("chain", "master", "validator"):
            assert any(role in command for command in started), started
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
        left = running_from(state)
        for each in left:
            each.kill()
    assert proc.returncode == 0, "".join(seen) + out
    assert "Stopped." in out
    assert [p.info["cmdline"] for p in left] == []


# A stop signal sent while an event loop runs, then code that stands for a grpc.aio
# completion callback: a signal must not interrupt it (see devnet._run_stoppable).
STOPPED_INSIDE_A_LOOP = """
import asyncio, os, signal
from platform_common import devnet

events = []

async def main():
    try:
        os.kill(os.getpid(), signal.{name})
        total = sum(range(200_000))
        events.append("uninterrupted")
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        events.append("cancelled")
        raise
    finally:
        events.append("unwound")

devnet._stop_on_signals()
try:
    devnet._run_stoppable(main())
except KeyboardInterrupt:
    events.append("KeyboardInterrupt")
handler = signal.getsignal(signal.{name})
print(",".join(events), handler not in (signal.SIG_DFL, signal.SIG_IGN))
"""


@pytest.mark.parametrize("signum", devnet.STOP_SIGNALS, ids=lambda s: s.name)
def test_a_stop_signal_cancels_the_live_view_instead_of_interrupting_it(
    signum: signal.Signals,
) -> None:
    """A stop signal that arrives while the live view's event loop runs cancels the view,
    which unwinds and closes its channel, and only then becomes the KeyboardInterrupt that
    stops the subnet; and the handlers that stop it between loops are back afterwards.
    Raised where it landed instead, inside grpc.aio's callbacks, it left the process hung
    or aborting at exit ("corrupted double-linked list")."""
    done = subprocess.run(
        [sys.executable, "-c", STOPPED_INSIDE_A_LOOP.format(name=signum.name)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["uninterrupted,cancelled,unwound,KeyboardInterrupt", "True"]


def test_dev_stops_with_the_reason_when_a_process_it_runs_dies(tmp_path: Path) -> None:
    """A master that dies is reported with its last log lines, and the rest is stopped:
    the live view does not go on reconnecting to nothing."""
    state = tmp_path / "state"
    proc = launch(tmp_path, state, 0, validators=0)
    seen: list[str] = []
    out = ""
    try:
        read_until(proc, r"Registry changes, sealed epochs and submissions appear below", seen, 180)
        records = [state / "runtime" / "challenges" / slug / RECORD for slug in ("http", "native")]

        async def both_examples_recorded() -> bool:
            return all(path.exists() for path in records)

        asyncio.run(eventually(both_examples_recorded, "both example challenges running", 120))
        [master] = [p for p in running_from(state) if "master" in p.info["cmdline"][:3]]
        master.kill()
        read_until(proc, r"platform dev: master exited with -9; last log lines:", seen, 30)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=30)
        left = running_from(state)
        for each in left:
            each.kill()
    assert proc.returncode == 1, "".join(seen) + out
    # Nothing is left: not what `platform dev` started itself, nor the example challenges,
    # which the dead master's local runtime started without a parent-death signal (so that
    # a restarted master adopts them) and a SIGKILLed master cannot stop.
    assert [p.info["cmdline"] for p in left] == []
    assert "Stopped the challenge instances the master left: http, native." in out
    assert "Stopped." in out
