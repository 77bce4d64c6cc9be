"""Masters for tests: in-process (same event loop) or as a real ``platform master`` process."""

from __future__ import annotations

import dataclasses
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from master.app import Master
from master.config import MasterConfig
from platform_network.v1 import registry_pb2_grpc

ADMIN_TOKEN = "test-admin-token-0123456789abcdef"
ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
VENV_BIN = Path(sys.executable).parent


def base_config(database_url: str, **overrides: Any) -> MasterConfig:
    config = MasterConfig(
        listen="127.0.0.1:0",
        database_url=database_url,
        admin_token=ADMIN_TOKEN,
        metrics_listen="",
        shutdown_grace=1.0,
        bookmark_interval=30.0,
        feed_poll_interval=0.2,
    )
    return dataclasses.replace(config, **overrides)


class RunningMaster:
    """An in-process master plus a channel and stub to it."""

    def __init__(self, master: Master) -> None:
        self.master = master
        self.address = f"127.0.0.1:{master.port}"
        self.channel = grpc.aio.insecure_channel(self.address)
        self.registry = registry_pb2_grpc.RegistryStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()
        await self.master.stop()


async def start_master(database_url: str, **overrides: Any) -> RunningMaster:
    master = Master(base_config(database_url, **overrides))
    await master.start()
    return RunningMaster(master)


class MasterProcess:
    """``platform master`` as a child process on a free port, stopped by PID."""

    def __init__(
        self, workdir: Path, database_url: str, *extra: str, env: dict[str, str] | None = None
    ) -> None:
        self.workdir = workdir
        self.database_url = database_url
        self.extra = extra
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.address = ""
        self.log_path = workdir / "master.log"

    def start(self, listen: str = "127.0.0.1:0") -> str:
        self.workdir.mkdir(parents=True, exist_ok=True)
        ready = self.workdir / "ready"
        ready.unlink(missing_ok=True)
        env = {**os.environ, "PLATFORM_ADMIN_TOKEN": ADMIN_TOKEN, **self.env}
        self.proc = subprocess.Popen(
            [
                str(VENV_BIN / "platform"),
                "master",
                "--listen",
                listen,
                "--database-url",
                self.database_url,
                "--metrics-listen",
                "127.0.0.1:0",
                "--ready-file",
                str(ready),
                "--shutdown-grace",
                "2",
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=self.log_path.open("ab"),
            env=env,
            cwd=self.workdir,
        )
        deadline = time.monotonic() + 30
        while not ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"master exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"master did not become ready:\n{self.log()}")
            time.sleep(0.02)
        self.address = ready.read_text().strip()
        return self.address

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 15) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


def epoch_master_process(
    workdir: Path, *extra: str, neurons: int, hotkey: str, database_url: str = ""
) -> MasterProcess:
    """``platform master`` over a new local simulated subnet of ``neurons`` neurons,
    sealing one epoch at start-up (then one an hour), signing with ``hotkey``; on
    ``database_url``, or a new SQLite database in ``workdir``."""
    from platform_common.chain import LocalSubnet  # the SDK is slow to import

    workdir.mkdir(parents=True, exist_ok=True)
    chain = workdir / "chain.json"
    LocalSubnet.create(chain, neurons=neurons, validators=2, manual_blocks=True)
    key = workdir / "token.key"
    key.write_text(secrets.token_hex(32))
    return MasterProcess(
        workdir / "master",
        database_url or f"sqlite+aiosqlite:///{workdir / 'registry.db'}",
        "--chain",
        f"local+file:{chain}",
        "--epoch-schedule",
        "interval",
        "--epoch-interval",
        "3600",
        "--token-key-file",
        str(key),
        *extra,
        env={"PLATFORM_HOTKEY": hotkey},
    )
