"""Fixtures: the agent's own store on SQLite and on a throwaway PostgreSQL database, and
a local simulated subnet with the real Bittensor SDK on top."""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from platform_common.chain import Chain, LocalSubnet, SubnetHyperparameters, open_chain
from tests.support.postgres import PostgresServer
from validator.store import Store

_counter = itertools.count()


async def fresh_store_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database for the agent's store on ``backend``; its URL."""
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / f'validator-{next(_counter)}.db'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return await server.create_database(f"validator_{os.getpid()}_{next(_counter)}")


@pytest.fixture
async def store_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return await fresh_store_url(backend, request, tmp_path)


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    opened = await Store.open(store_url)
    try:
        yield opened
    finally:
        await opened.close()


@dataclass
class LocalChain:
    url: str
    subnet: LocalSubnet
    chain: Chain


@pytest.fixture
async def local_chain(tmp_path: Path) -> AsyncIterator[LocalChain]:
    """Netuid 1, 8 neurons (uids 0-3 validators), blocks advanced by hand, rate limit 10."""
    path = tmp_path / "chain.json"
    subnet = LocalSubnet.create(
        path,
        netuid=1,
        neurons=8,
        validators=4,
        manual_blocks=True,
        hyperparameters=SubnetHyperparameters(weights_rate_limit=10),
    )
    await subnet.advance(5)  # past genesis: block 0 cannot carry a report's block
    url = f"local+file:{path}"
    chain = open_chain(url, 1)
    try:
        yield LocalChain(url, subnet, chain)
    finally:
        await chain.close()
