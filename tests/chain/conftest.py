"""Fixtures: a simulated subnet in a temporary directory and the SDK-backed Chain over it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from platform_common.chain import LocalSubnet, SdkChain, SubnetHyperparameters, open_chain

NETUID = 7
NEURONS = 8
VALIDATORS = 3
RATE_LIMIT = 5


@pytest.fixture
def state_path(tmp_path: Path) -> Path:
    return tmp_path / "chain.json"


@pytest.fixture
def subnet(state_path: Path) -> LocalSubnet:
    """8 neurons (uids 0-2 validators), blocks advanced by hand, rate limit 5 blocks."""
    return LocalSubnet.create(
        state_path,
        netuid=NETUID,
        neurons=NEURONS,
        validators=VALIDATORS,
        manual_blocks=True,
        hyperparameters=SubnetHyperparameters(weights_rate_limit=RATE_LIMIT, tempo=20),
    )


@pytest.fixture
async def chain(subnet: LocalSubnet, state_path: Path) -> AsyncIterator[SdkChain]:
    await subnet.advance(10)  # past genesis, so rate limits and history have room
    opened = open_chain(f"local+file:{state_path}", NETUID)
    assert isinstance(opened, SdkChain)
    try:
        yield opened
    finally:
        await opened.close()
