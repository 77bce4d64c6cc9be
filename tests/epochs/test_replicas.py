"""Master replicas on the tempo schedule: one replica runs each tempo's epoch."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from sqlalchemy.ext.asyncio import AsyncEngine

from master.db.engine import create_engine
from master.db.models import EpochTempoRow
from master.weights.epochs import tempo_position
from master.weights.store import WeightsStore
from platform_network.v1 import weights_pb2
from tests.epochs.conftest import (
    EpochMaster,
    sealed_vectors,
    start_epoch_master,
    tempo_schedule,
    tempo_subnet,
)
from tests.support.master import ADMIN
from tests.support.waiting import eventually

TEMPO, LEAD = 12, 4
# The store runs on both backends; the schedule needs one.
on_sqlite = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
TEMPO_CLAIMS = EpochTempoRow.metadata.tables[EpochTempoRow.__tablename__]


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    created = create_engine(database_url)
    try:
        yield created
    finally:
        await created.dispose()


async def test_a_tempo_is_claimed_once_and_given_back_only_by_its_holder(
    engine: AsyncEngine,
) -> None:
    store = WeightsStore(engine)
    assert await store.claim_tempo(120, "a")
    assert not await store.claim_tempo(120, "b")
    assert not await store.claim_tempo(120, "a")  # not twice by the same holder either
    assert await store.tempo_holder(120) == "a"
    assert await store.claim_tempo(133, "b")  # the next tempo is free

    await store.release_tempo(120, "b")  # not b's to give back
    assert await store.tempo_holder(120) == "a"
    await store.release_tempo(120, "a")
    assert await store.tempo_holder(120) is None
    assert await store.claim_tempo(120, "b")

    # Pruning keeps the newest claims, as it keeps the newest epochs.
    assert await store.claim_tempo(146, "a")
    await store.prune(keep=2)
    assert [await store.tempo_holder(b) for b in (120, 133, 146)] == [None, "b", "a"]


@on_sqlite
async def test_replicas_on_the_tempo_schedule_run_each_tempo_once(
    database_url: str, engine: AsyncEngine, tmp_path: Path, token_key_file: Path
) -> None:
    subnet = tempo_subnet(tmp_path, tempo=TEMPO, block_time=0.05)
    settings = {**tempo_schedule(lead=LEAD, block_time=0.05), "feed_poll_interval": 0.1}
    masters: list[EpochMaster] = []
    runs: Counter[tuple[str, int]] = Counter()
    for _ in range(2):
        master = await start_epoch_master(database_url, subnet, token_key_file, **settings)
        masters.append(master)
        count_runs(master, runs)
    try:
        sealed = await sealed_vectors(masters[0], 4)
        store = WeightsStore(engine)
        holders = []
        for vector in sealed:
            _, remaining = tempo_position(vector.metagraph_block, 1, TEMPO)
            holders.append(await store.tempo_holder(vector.metagraph_block + remaining))
    finally:
        for master in masters:
            await master.close()
    slots = [tempo_position(v.metagraph_block, 1, TEMPO)[0] for v in sealed]
    assert slots == sorted(set(slots)), f"one epoch per tempo: {slots}"
    assert [v.epoch for v in sealed] == list(range(sealed[0].epoch, sealed[0].epoch + 4))
    # Each of these tempos was run by one replica only, the one that holds its claim.
    for slot, holder in zip(slots, holders, strict=True):
        assert {h: n for (h, s), n in runs.items() if s == slot} == {holder: 1}, (slot, runs)
    assert set(holders) <= {m.engine.holder for m in masters}


def count_runs(master: EpochMaster, runs: Counter[tuple[str, int]]) -> None:
    """Count the master's epoch runs by (holder, tempo slot) (a spy: each run goes on)."""
    engine = master.engine
    run = engine.run_epoch

    async def counted(block: int | None = None) -> weights_pb2.Epoch:
        assert block is not None  # the schedule passes the block that chose the tempo
        runs[(engine.holder, tempo_position(block, 1, TEMPO)[0])] += 1
        return await run(block)

    engine.run_epoch = counted  # type: ignore[method-assign]


def yielded(caplog: pytest.LogCaptureFixture) -> list[int]:
    return [
        int(getattr(r, "tempo_end_block", -1))
        for r in caplog.records
        if r.name == "master.weights.epochs" and r.getMessage() == "epoch left to another replica"
    ]


@on_sqlite
async def test_a_tempo_given_back_is_taken_by_another_replica(
    database_url: str,
    engine: AsyncEngine,
    tmp_path: Path,
    token_key_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="master.weights.epochs")
    taken_before = taken()
    subnet = tempo_subnet(tmp_path, tempo=TEMPO, block_time=0.1)
    store = WeightsStore(engine)
    # Another replica holds the next tempo, the one after the current block's.
    block = await subnet.local.head()
    _, remaining = tempo_position(block, 1, TEMPO)
    held = block + remaining + TEMPO + 1
    assert await store.claim_tempo(held, "other-replica")
    master = await start_epoch_master(
        database_url, subnet, token_key_file, **tempo_schedule(lead=8, block_time=0.1)
    )
    try:

        async def left_to_the_other() -> bool:
            return held in yielded(caplog)

        await eventually(left_to_the_other, what="the held tempo left to its holder")
        assert await store.tempo_holder(held) == "other-replica"
        await store.release_tempo(held, "other-replica")  # it could not seal

        async def sealed_by_this_master() -> bool:
            return await store.tempo_holder(held) == master.engine.holder

        await eventually(sealed_by_this_master, what="the tempo taken over")
        stream = master.weights.WatchWeights(
            weights_pb2.WatchWeightsRequest(since_epoch=0), metadata=ADMIN
        )
        async for message in stream:
            vector = message.vector if message.HasField("vector") else message.snapshot.latest
            _, left = tempo_position(vector.metagraph_block, 1, TEMPO)
            if vector.metagraph_block + left == held:
                break
        stream.cancel()
    finally:
        await master.close()
    assert yielded(caplog).count(held) == 1  # said once, however often it looked again
    assert taken() == taken_before + 1  # and counted once


@on_sqlite
async def test_a_claim_the_database_refuses_is_not_taken_for_another_replicas(
    database_url: str,
    engine: AsyncEngine,
    tmp_path: Path,
    token_key_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="master.weights.epochs")
    taken_before = taken()
    async with engine.begin() as conn:
        await conn.run_sync(TEMPO_CLAIMS.drop)
    subnet = tempo_subnet(tmp_path, tempo=TEMPO, block_time=0.05)
    master = await start_epoch_master(
        database_url, subnet, token_key_file, **tempo_schedule(lead=LEAD, block_time=0.05)
    )
    try:

        async def refused() -> bool:
            return any(r.getMessage() == "cannot claim the tempo's epoch" for r in caplog.records)

        await eventually(refused, what="a claim the database refused")
        assert await WeightsStore(engine).last_epoch() == 0
        async with engine.begin() as conn:  # the database is back
            await conn.run_sync(TEMPO_CLAIMS.create)
        sealed = await sealed_vectors(master, 1)
    finally:
        await master.close()
    assert sealed[0].epoch == 1
    # Neither said nor counted as another replica's tempo.
    assert yielded(caplog) == []
    assert taken() == taken_before


def taken() -> float:
    """``platform_epochs_total{outcome="taken"}`` so far (every master in this process)."""
    return REGISTRY.get_sample_value("platform_epochs_total", {"outcome": "taken"}) or 0.0


@on_sqlite
async def test_a_replica_that_cannot_seal_gives_its_tempo_back(
    database_url: str,
    engine: AsyncEngine,
    tmp_path: Path,
    token_key_file: Path,
) -> None:
    subnet = tempo_subnet(tmp_path, tempo=TEMPO, block_time=0.05)
    runs: Counter[tuple[str, int]] = Counter()
    # Burn UID 40 is not in the 8-neuron metagraph: no epoch can be sealed.
    master = await start_epoch_master(
        database_url,
        subnet,
        token_key_file,
        **tempo_schedule(lead=LEAD, block_time=0.05),
        burn_uid=40,
    )
    count_runs(master, runs)
    try:

        async def ran_twice() -> bool:
            return sum(runs.values()) >= 2

        await eventually(ran_twice, what="two failed epochs")
    finally:
        await master.close()
    store = WeightsStore(engine)
    assert await store.last_epoch() == 0
    for _, slot in runs:
        assert await store.tempo_holder(end_of(slot)) is None, slot


@on_sqlite
async def test_a_replica_stopped_mid_run_gives_its_tempo_back(
    database_url: str,
    engine: AsyncEngine,
    tmp_path: Path,
    token_key_file: Path,
) -> None:
    subnet = tempo_subnet(tmp_path, tempo=TEMPO, block_time=0.05)
    master = await start_epoch_master(
        database_url, subnet, token_key_file, **tempo_schedule(lead=LEAD, block_time=0.05)
    )
    store = WeightsStore(engine)
    started: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    run = master.engine.run_epoch

    async def held(block: int | None = None) -> weights_pb2.Epoch:
        # A run still collecting when the replica stops (a rolling restart).
        assert block is not None
        if not started.done():
            started.set_result(tempo_position(block, 1, TEMPO)[0])
        await asyncio.Event().wait()
        return await run(block)

    master.engine.run_epoch = held  # type: ignore[method-assign]
    try:
        slot = await asyncio.wait_for(started, 30)
        assert await store.tempo_holder(end_of(slot)) == master.engine.holder
    finally:
        await master.close()
    # Given back, so another replica can still run the tempo's epoch.
    assert await store.tempo_holder(end_of(slot)) is None


def end_of(slot: int) -> int:
    """The block at which tempo ``slot`` of netuid 1 ends (see ``tempo_position``)."""
    return slot * (TEMPO + 1) + TEMPO - 2
