"""Local runtimes for tests, and a net under them: whatever a test leaves running
(instances left for adoption, a runtime never closed) is stopped by PID at teardown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import aiohttp
import grpc

from platform_common.runtime import Instance, InstanceState
from platform_common.runtime.images import ImageMap, load
from platform_common.runtime.local import RECORD, LocalRuntime, start_time
from platform_network.v1 import challenge_pb2, challenge_pb2_grpc
from tests.support.waiting import eventually

REPO = Path(__file__).resolve().parents[2]
IMAGE_MAP = REPO / "examples" / "images.json"
NATIVE = "ghcr.io/platform-network/example-native"
HTTP = "ghcr.io/platform-network/example-http"
TOKEN = "test-runtime-token-0123456789abcdef"
# //Alice's hotkey: a valid SS58 address the shim accepts in an answer.
ALICE = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"
HOTKEY_HEADER = "X-Platform-Verified-Hotkey"
WITHIN = 45.0  # bound for a pair of Python processes to start on a busy 2-CPU machine


def images() -> ImageMap:
    return load(IMAGE_MAP)


def auth(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    return start_time(pid) is not None


class Runtimes:
    """Makes local runtimes on one state directory; cleans up after all of them."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.opened: list[LocalRuntime] = []
        self.seen: dict[int, int] = {}  # pid -> start time, of every process a test saw

    def new(self, **overrides: Any) -> LocalRuntime:
        settings: dict[str, Any] = {
            "backoff_initial": 0.2,
            "backoff_max": 2.0,
            "grace": 3.0,
            "start_timeout": WITHIN,
            "watch_interval": 0.1,
        }
        settings.update(overrides)
        runtime = LocalRuntime(self.state_dir, images(), **settings)
        self.opened.append(runtime)
        return runtime

    def saw(self, instance: Instance | None) -> None:
        for pid in instance.pids.values() if instance is not None else ():
            started = start_time(pid)
            if started is not None:
                self.seen.setdefault(pid, started)

    async def cleanup(self) -> None:
        for runtime in self.opened:
            with contextlib.suppress(Exception):
                await runtime.close(stop_instances=True)
        leftovers = dict(self.seen)
        for record in self.state_dir.glob(f"challenges/*/{RECORD}"):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                for entry in json.loads(record.read_text())["processes"].values():
                    leftovers.setdefault(int(entry["pid"]), int(entry["start_time"]))
        for pid, started in leftovers.items():
            if start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

        def all_gone() -> bool:
            for pid, started in leftovers.items():
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(pid, os.WNOHANG)  # our own children: collect the zombie
                if start_time(pid) == started:
                    return False
            return True

        with contextlib.suppress(AssertionError):
            await eventually(_sync(all_gone), "leftover processes gone", within=10)


def environ_of(pid: int) -> list[bytes]:
    """The environment ``pid`` was started with, as NAME=value entries."""
    return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")


def _sync(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def run() -> bool:
        return check()

    return run


async def wait_state(
    runtimes: Runtimes,
    runtime: LocalRuntime,
    slug: str,
    state: InstanceState = InstanceState.RUNNING,
    *,
    unless_pids: Iterable[int] = (),
    within: float = WITHIN,
) -> Instance:
    """The instance of ``slug`` once in ``state`` (with none of ``unless_pids``)."""
    old = set(unless_pids)
    last: list[Instance | None] = [None]

    async def check() -> Instance | None:
        instance = await runtime.status(slug)
        last[0] = instance
        runtimes.saw(instance)
        if instance is None or instance.state is not state:
            return None
        return None if old & set(instance.pids.values()) else instance

    try:
        return await eventually(check, f"{slug} {state.value}", within)
    except AssertionError as exc:
        logs = {
            role: runtime.log_path(slug, role).read_text(errors="replace")[-1500:]
            for role in ("challenge", "shim")
            if runtime.log_path(slug, role).exists()
        }
        raise AssertionError(f"{exc}; last seen: {last[0]}; logs: {logs}") from None


async def get_weights(address: str, token: str) -> list[tuple[str, float]]:
    """ChallengeInternal.GetWeights through the shim at ``address``, as the master calls it.

    UNAVAILABLE is retried for a few seconds: a shim started a moment ago may not have
    connected to its challenge yet (it allows only a short connection handshake).
    """
    deadline = time.monotonic() + 15
    async with grpc.aio.insecure_channel(address) as channel:
        stub = challenge_pb2_grpc.ChallengeInternalStub(channel)
        while True:
            try:
                answer = await stub.GetWeights(
                    challenge_pb2.GetWeightsRequest(epoch=1, epoch_id="epoch-1", netuid=1),
                    metadata=auth(token),
                    timeout=10,
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
                continue
            return [(e.hotkey, e.score) for e in answer.entries]


async def weights_refused(address: str, token: str) -> grpc.StatusCode:
    """The status code of a GetWeights call that must fail."""
    try:
        await get_weights(address, token)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    raise AssertionError(f"GetWeights through {address} answered with a wrong token")


async def solve(public_address: str, hotkey: str, task_id: int) -> None:
    """Solve one task through the challenge's public API as miner ``hotkey``."""
    async with aiohttp.ClientSession(base_url=f"http://{public_address}") as http:
        async with http.get("/task", params={"id": str(task_id)}) as answer:
            assert answer.status == 200, await answer.text()
            task = await answer.json()
        body = {"task_id": task_id, "answer": sum(task["numbers"])}
        async with http.post("/submit", json=body, headers={HOTKEY_HEADER: hotkey}) as answer:
            assert answer.status == 200, await answer.text()
            assert (await answer.json())["correct"] is True
