"""Fixtures: a throwaway PostgreSQL server per session, a fresh migrated database
per test on each backend, and masters to talk to."""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import pytest

from master.db import migrate
from master.db.engine import create_engine
from tests.support.master import RunningMaster, start_master
from tests.support.postgres import PostgresServer

_counter = itertools.count()


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    server = PostgresServer(tmp_path_factory.mktemp("pg"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_template(postgres_server: PostgresServer) -> str:
    """A database migrated once; test databases are cloned from it.

    Sync on purpose: it is requested lazily (only by PostgreSQL-parametrized tests)
    from inside running async fixtures, so it does its async work on its own loop
    in a worker thread.
    """

    async def build() -> None:
        url = await postgres_server.create_database("platform_template")
        engine = create_engine(url)
        try:
            await migrate.upgrade(engine)
        finally:
            await engine.dispose()

    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, build()).result()
    return "platform_template"


async def fresh_database(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, fully migrated database on ``backend``; its URL."""
    if backend == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / f'registry-{next(_counter)}.db'}"
        engine = create_engine(url)
        try:
            await migrate.upgrade(engine)
        finally:
            await engine.dispose()
        return url
    server: PostgresServer = request.getfixturevalue("postgres_server")
    template: str = request.getfixturevalue("postgres_template")
    # A new history_id per database, as a real deployment would have.
    url = await server.create_database(f"test_{os.getpid()}_{next(_counter)}", template=template)
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        await conn.execute("UPDATE registry_state SET history_id = $1", uuid.uuid4().hex)
    finally:
        await conn.close()
    return url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def database_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return await fresh_database(backend, request, tmp_path)


@pytest.fixture
async def master(database_url: str) -> AsyncIterator[RunningMaster]:
    running = await start_master(database_url)
    try:
        yield running
    finally:
        await running.close()
