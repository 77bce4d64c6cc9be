"""A master with epochs over a local simulated subnet (real Bittensor SDK on top)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from master.weights.epochs import EpochEngine
from platform_common.chain import LocalSubnet
from platform_network.v1 import weights_pb2, weights_pb2_grpc
from tests.support.master import RunningMaster, start_master

MASTER_KEY = "//platform-test/master"


@dataclass
class Subnet:
    url: str
    local: LocalSubnet


@pytest.fixture
def subnet(tmp_path: Path) -> Subnet:
    path = tmp_path / "chain.json"
    local = LocalSubnet.create(path, netuid=1, neurons=16, validators=4, manual_blocks=True)
    return Subnet(f"local+file:{path}", local)


@pytest.fixture
def token_key_file(tmp_path: Path) -> Path:
    path = tmp_path / "token.key"
    path.write_text(secrets.token_hex(32) + "\n")
    return path


async def read(stream: Any) -> weights_pb2.WatchWeightsResponse:
    """The next message of a WatchWeights stream."""
    message = await stream.read()
    assert isinstance(message, weights_pb2.WatchWeightsResponse), message
    return message


class EpochMaster:
    """A running master whose epochs are sealed on demand by the test."""

    def __init__(self, running: RunningMaster) -> None:
        self.running = running
        self.address = running.address
        self.registry = running.registry
        self.weights = weights_pb2_grpc.WeightsStub(running.channel)

    @property
    def engine(self) -> EpochEngine:
        engine = self.running.master.epochs
        assert engine is not None
        return engine

    async def seal(self) -> weights_pb2.Epoch:
        return await self.engine.run_epoch()

    async def close(self) -> None:
        await self.running.close()


async def start_epoch_master(
    database_url: str, subnet: Subnet, token_key_file: Path, **overrides: Any
) -> EpochMaster:
    settings: dict[str, Any] = {
        "chain": subnet.url,
        "hotkey": MASTER_KEY,
        "epochs": False,  # sealed on demand (seal()) unless a test asks for the schedule
        "token_key_file": str(token_key_file),
    }
    running = await start_master(database_url, **{**settings, **overrides})
    return EpochMaster(running)


@pytest.fixture
async def epoch_master(
    database_url: str, subnet: Subnet, token_key_file: Path
) -> AsyncIterator[EpochMaster]:
    running = await start_epoch_master(database_url, subnet, token_key_file)
    try:
        yield running
    finally:
        await running.close()
