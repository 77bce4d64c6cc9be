"""``platform chain`` as a real process, shared by several clients."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from platform_common.chain import (
    RemoteSubnet,
    SdkChain,
    SubmitOutcome,
    dev_keypair,
    open_chain,
    open_local_subnet,
)

pytestmark = pytest.mark.process

PLATFORM = str(Path(sys.executable).parent / "platform")
NETUID = 3


class ChainProcess:
    """``platform chain`` on a free loopback port, stopped by PID."""

    def __init__(self, workdir: Path, *extra: str) -> None:
        self.workdir = workdir
        self.state = workdir / "chain.json"
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.address = ""

    def start(self) -> str:
        ready = self.workdir / "ready"
        ready.unlink(missing_ok=True)
        log = (self.workdir / "chain.log").open("ab")
        self.proc = subprocess.Popen(
            [
                PLATFORM,
                "chain",
                "--state",
                str(self.state),
                "--listen",
                "127.0.0.1:0",
                "--ready-file",
                str(ready),
                "--netuid",
                str(NETUID),
                "--neurons",
                "6",
                "--validators",
                "2",
                "--weights-rate-limit",
                "3",
                "--log-format",
                "text",
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env={k: v for k, v in os.environ.items() if not k.startswith("PLATFORM_")},
        )
        log.close()
        deadline = time.monotonic() + 60
        while not ready.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"platform chain exited early:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"platform chain did not start:\n{self.log()}")
            time.sleep(0.05)
        self.address = ready.read_text().strip()
        return self.address

    @property
    def url(self) -> str:
        return f"local+http://{self.address}"

    def log(self) -> str:
        return (self.workdir / "chain.log").read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM, then the exit code (killed after 20 s if it does not stop)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def chain_process(tmp_path: Path) -> Iterator[ChainProcess]:
    process = ChainProcess(tmp_path, "--manual-blocks")
    process.start()
    try:
        yield process
    finally:
        process.stop()


def sdk_chain(url: str) -> SdkChain:
    chain = open_chain(url, NETUID)
    assert isinstance(chain, SdkChain)
    return chain


async def test_two_clients_share_one_subnet_and_restart_keeps_it(
    chain_process: ChainProcess,
) -> None:
    first, second = sdk_chain(chain_process.url), sdk_chain(chain_process.url)
    control = open_local_subnet(chain_process.url)
    assert isinstance(control, RemoteSubnet)
    try:
        assert await control.advance(20) == 20
        assert await first.current_block() == await second.current_block() == 20
        graph = await first.metagraph()
        assert graph == await second.metagraph()
        assert graph.hotkey_of(1) == dev_keypair("hotkey", 1).ss58_address
        assert [n.validator_permit for n in graph.neurons] == [True, True] + [False] * 4

        planned = first.plan_weights({2: 0.6, 3: 0.4}, await first.hyperparameters())
        result = await first.set_weights(dev_keypair("hotkey", 1), planned)
        assert result.outcome is SubmitOutcome.SUBMITTED, result.message
        # The other client reads what the first one put on chain, through its SDK too.
        row = await second.client.query(("SubtensorModule", "Weights"), [NETUID, 1])
        assert [tuple(pair) for pair in row] == list(zip(planned.uids, planned.values, strict=True))
        stored = await control.weights_set(1)
        assert stored is not None
        assert (stored.uids, stored.values) == (planned.uids, planned.values)
        # The rate limit holds for the other client signing with the same hotkey.
        limited = await second.set_weights(dev_keypair("hotkey", 1), planned)
        assert limited.outcome is SubmitOutcome.RATE_LIMITED
        assert limited.next_allowed_block == 23
        genesis = (await control.chain_info())["genesis_hash"]
    finally:
        await first.close()
        await second.close()
        await control.close()

    assert chain_process.stop() == 0
    assert "stopped; state saved at block 20" in chain_process.log()

    chain_process.start()  # the same state file and settings
    again = sdk_chain(chain_process.url)
    control = open_local_subnet(chain_process.url)
    try:
        assert (await control.chain_info())["genesis_hash"] == genesis
        assert await again.current_block() == 20  # still manual: resumes where it stopped
        assert await again.metagraph(block=20) == graph
        kept = await control.weights_set(1)
        assert kept == stored
    finally:
        await again.close()
        await control.close()
    assert chain_process.stop() == 0


async def test_blocks_advance_with_time_when_not_manual(tmp_path: Path) -> None:
    process = ChainProcess(tmp_path, "--block-time", "0.05")
    process.start()
    chain = sdk_chain(process.url)
    try:
        start = await chain.current_block()
        for _ in range(200):
            if await chain.current_block() >= start + 3:
                break
            await asyncio.sleep(0.05)
        assert await chain.current_block() >= start + 3
    finally:
        await chain.close()
        assert process.stop() == 0


async def test_the_rpc_refuses_bad_requests_naming_the_problem(
    chain_process: ChainProcess,
) -> None:
    url = f"http://{chain_process.address}/v1/rpc"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{chain_process.address}/v1/health") as reply:
            assert await reply.json() == {"netuid": NETUID, "head": 0}
        async with session.post(url, json={"method": "drop_tables"}) as reply:
            assert reply.status == 404
            assert (await reply.json())["error"] == {
                "type": "invalid",
                "message": "unknown method 'drop_tables'",
            }
        async with session.post(url, json={"method": "storage", "params": {}}) as reply:
            assert reply.status == 400
            assert (await reply.json())["error"]["message"] == "missing parameter 'module'"
        async with session.post(url, data=b"{not json") as reply:
            assert reply.status == 400
            assert "request body is not JSON" in (await reply.json())["error"]["message"]
    control = RemoteSubnet(f"http://{chain_process.address}")
    try:
        with pytest.raises(ValueError, match=r"max_weight_limit: must be an integer in 0..65535"):
            await control.set_hyperparameters(max_weight_limit=-1)
        with pytest.raises(ValueError, match="hotkey: 'nobody' is not an SS58 address"):
            await control.register("nobody", dev_keypair("coldkey", 0).ss58_address)
    finally:
        await control.close()


def test_a_non_loopback_listen_address_is_refused(tmp_path: Path) -> None:
    done = subprocess.run(
        [PLATFORM, "chain", "--state", str(tmp_path / "c.json"), "--listen", "0.0.0.0:0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "--listen: 0.0.0.0 is not a loopback address" in done.stderr
    assert not (tmp_path / "c.json").exists()
