"""``platform dev`` run headless, as the tests and ``bench.subnet`` drive it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil

from tests.support.master import VENV_BIN


def dev_env() -> dict[str, str]:
    """The environment ``platform dev`` runs in: the venv first on PATH, no admin token."""
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"}
    env.pop("PLATFORM_ADMIN_TOKEN", None)
    return env


def launch(
    cwd: Path, state: Path, edge_port: int, *, validators: int, ignoring_sigint: bool = False
) -> subprocess.Popen[str]:
    """``platform dev`` on free ports (the edge on ``edge_port``), output on a pipe; with
    ``ignoring_sigint``, started with SIGINT ignored, as a shell starts a script's
    background job (through ``sh``, which then becomes ``platform dev``: same PID)."""
    shell = ["sh", "-c", 'trap "" INT; exec "$@"', "sh"] if ignoring_sigint else []
    return subprocess.Popen(
        [
            *shell,
            str(VENV_BIN / "platform"),
            "dev",
            "--state-dir",
            str(state),
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--edge-port",
            str(edge_port),
            "--edge-admin-port",
            "0",
            "--chain-port",
            "0",
            "--validators",
            str(validators),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dev_env(),
        cwd=cwd,
    )


def read_until(
    proc: subprocess.Popen[str], pattern: str, seen: list[str], within: float = 30
) -> str:
    """Read output lines into ``seen`` until one matches ``pattern``; fail after ``within`` s.

    A ``platform dev`` that goes quiet would leave ``readline`` waiting forever: past the
    deadline it is asked to stop (SIGINT, as Ctrl-C), which ends its output."""
    assert proc.stdout is not None
    deadline = time.monotonic() + within
    watchdog = threading.Timer(within, proc.send_signal, (signal.SIGINT,))
    watchdog.start()
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if re.search(pattern, line):
                return line
    finally:
        watchdog.cancel()
    raise AssertionError(f"{pattern!r} not printed within {within:g} s; got:\n{''.join(seen)}")


def running_from(state: Path) -> list[psutil.Process]:
    """Processes still running from the state directory ``state`` (named in their command
    line); each with its ``info["cmdline"]``."""
    return [
        p
        for p in psutil.process_iter(["cmdline"])
        if any(str(state) in part for part in p.info["cmdline"] or ())
    ]


def left_behind(state: Path) -> list[list[str]]:
    """Command lines of processes still running from the state directory ``state``."""
    return [p.info["cmdline"] for p in running_from(state)]


def run_shell(script: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``script`` in bash, as a reader would paste it; fails the test when it fails."""
    result = subprocess.run(
        ["bash", "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result
