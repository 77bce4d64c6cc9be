"""Real processes for the shim tests: ``platform shim`` and the example challenges."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from platform_network.v1 import challenge_pb2, challenge_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
EXAMPLES = REPO / "examples" / "challenges"
TOKEN = "test-challenge-token-0123456789abcdef"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
SLUG = "sum-bench"
HOTKEY_HEADER = "X-Platform-Verified-Hotkey"


class Process:
    """A child process that reports its addresses in a JSON ready file; stopped by PID."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        workdir: Path,
        env: Mapping[str, str | None] | None = None,
    ) -> None:
        """``env`` is added to this process's environment; a None value removes the variable."""
        self.name = name
        self.workdir = workdir
        self.ready_path = workdir / f"{name}.ready.json"
        self.log_path = workdir / f"{name}.log"
        self.argv = [*argv, "--ready-file", str(self.ready_path)]
        merged = {**os.environ, **(env or {})}
        self.env = {key: value for key, value in merged.items() if value is not None}
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready: dict[str, Any] = {}

    def start(self, timeout: float = 30) -> dict[str, Any]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ready_path.unlink(missing_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=self.env,
                cwd=REPO,
            )
        deadline = time.monotonic() + timeout
        while not self.ready_path.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.name} did not become ready:\n{self.log()}")
            time.sleep(0.02)
        self.ready = json.loads(self.ready_path.read_text())
        return self.ready

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 15) -> int:
        """SIGTERM, then the exit code."""
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


def native_challenge(workdir: Path, fault: str = "", internal_port: int = 0) -> Process:
    """The SDK example (gRPC), checking the token like a careful challenge."""
    argv = [
        sys.executable,
        str(EXAMPLES / "native" / "challenge.py"),
        "--internal",
        f"127.0.0.1:{internal_port}",
        "--public",
        "127.0.0.1:0",
    ]
    if fault:
        argv += ["--fault", fault]
    return Process(f"native-{fault or 'ok'}", argv, workdir, {"CHALLENGE_TOKEN": TOKEN})


def http_challenge(workdir: Path, fault: str = "", port: int = 0) -> Process:
    """The HTTP-only example."""
    argv = [
        sys.executable,
        str(EXAMPLES / "http" / "challenge.py"),
        "--listen",
        f"127.0.0.1:{port}",
        "--slug",
        SLUG,
    ]
    if fault:
        argv += ["--fault", fault]
    return Process(f"http-{fault or 'ok'}", argv, workdir, {"CHALLENGE_TOKEN": TOKEN})


def shim(
    workdir: Path,
    challenge_address: str,
    *extra: str,
    name: str = "shim",
    transport: str = "grpc",
    slug: str = SLUG,
    token: str = TOKEN,
    env: Mapping[str, str | None] | None = None,
) -> Process:
    """``platform shim`` for ``slug`` in front of ``challenge_address``; token from the
    environment (and ``env``, as :class:`Process` takes it)."""
    argv = [
        str(VENV_BIN / "platform"),
        "shim",
        "--listen",
        "127.0.0.1:0",
        "--slug",
        slug,
        "--challenge-address",
        challenge_address,
        "--transport",
        transport,
        "--metrics-listen",
        "127.0.0.1:0",
        "--shutdown-grace",
        "2",
        *extra,
    ]
    return Process(name, argv, workdir, {"PLATFORM_SHIM_CHALLENGE_TOKEN": token, **(env or {})})


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def stub(channel: grpc.aio.Channel) -> challenge_pb2_grpc.ChallengeInternalAsyncStub:
    return challenge_pb2_grpc.ChallengeInternalStub(channel)


def weights_request(epoch: int = 1) -> challenge_pb2.GetWeightsRequest:
    return challenge_pb2.GetWeightsRequest(
        epoch=epoch, epoch_id=f"epoch-{epoch}", netuid=7, metagraph_block=1000
    )


async def wait_reachable(
    client: challenge_pb2_grpc.ChallengeInternalAsyncStub, within: float = 15
) -> None:
    """Until the shim reaches its challenge (GetInfo answers), e.g. after a restart."""
    deadline = time.monotonic() + within
    while True:
        try:
            await client.GetInfo(challenge_pb2.GetInfoRequest(), metadata=AUTH, timeout=5)
            return
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.05)


def details(error: grpc.aio.AioRpcError) -> str:
    """The status message of ``error`` ("" when it has none)."""
    return error.details() or ""


def preconditions(error: grpc.aio.AioRpcError) -> list[tuple[str, str, str]]:
    """(type, subject, description) of each PreconditionFailure violation in ``error``."""
    status = rpc_status.from_call(error)
    out: list[tuple[str, str, str]] = []
    for detail in status.details if status is not None else ():
        info = error_details_pb2.PreconditionFailure()
        if detail.Unpack(info):
            out += [(v.type, v.subject, v.description) for v in info.violations]
    return out
