"""A master with epochs over a local simulated subnet (real Bittensor SDK on top)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from master.weights.epochs import EpochEngine
from platform_common.chain import LocalSubnet, SubnetHyperparameters
from platform_network.v1 import weights_pb2, weights_pb2_grpc
from tests.support.master import ADMIN, RunningMaster, start_master

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


def tempo_subnet(tmp_path: Path, *, tempo: int, block_time: float) -> Subnet:
    """A netuid-1 subnet of 8 neurons whose blocks advance on their own."""
    path = tmp_path / "chain.json"
    LocalSubnet.create(
        path,
        neurons=8,
        validators=2,
        block_time=block_time,
        hyperparameters=SubnetHyperparameters(tempo=tempo),
    )
    return Subnet(f"local+file:{path}", LocalSubnet.open(path))


def tempo_schedule(*, lead: int, block_time: float) -> dict[str, Any]:
    """Master settings for epochs on the tempo schedule."""
    return {
        "epochs": True,
        "epoch_schedule": "tempo",
        "epoch_lead_blocks": lead,
        "block_time": block_time,
    }


async def sealed_vectors(master: EpochMaster, count: int) -> list[weights_pb2.WeightVector]:
    """The next ``count`` vectors ``master`` pushes on WatchWeights."""
    stream = master.weights.WatchWeights(
        weights_pb2.WatchWeightsRequest(since_epoch=0), metadata=ADMIN
    )
    sealed: list[weights_pb2.WeightVector] = []
    try:
        async for message in stream:
            if message.HasField("vector"):
                sealed.append(message.vector)
            if len(sealed) == count:
                break
    finally:
        stream.cancel()
    return sealed
