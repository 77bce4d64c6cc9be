"""WatchRegistry: snapshots, exact resume, resync reasons, bookmarks, replicas."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from master.db.engine import create_engine
from master.registry.rules import Policy
from master.registry.store import RegistryStore
from master.registry.tokens import TokenIssuer
from platform_network.v1 import common_pb2, registry_pb2, registry_pb2_grpc
from tests.helpers import ACTIVE, INACTIVE, create, refused, set_status
from tests.support.master import ADMIN, RunningMaster, start_master

Reason = common_pb2.SnapshotReason
Event = registry_pb2.RegistryEvent


def watch(
    stub: registry_pb2_grpc.RegistryAsyncStub, since: int = 0, history_id: str = ""
) -> grpc.aio.UnaryStreamCall[
    registry_pb2.WatchRegistryRequest, registry_pb2.WatchRegistryResponse
]:
    return stub.WatchRegistry(
        registry_pb2.WatchRegistryRequest(since_revision=since, history_id=history_id),
        metadata=ADMIN,
    )


WatchCall = grpc.aio.UnaryStreamCall[
    registry_pb2.WatchRegistryRequest, registry_pb2.WatchRegistryResponse
]


async def take(
    stream: WatchCall, count: int, within: float = 10
) -> list[registry_pb2.WatchRegistryResponse]:
    async def collect() -> list[registry_pb2.WatchRegistryResponse]:
        out = []
        async for message in stream:
            out.append(message)
            if len(out) == count:
                break
        return out

    return await asyncio.wait_for(collect(), within)


async def test_first_message_is_an_initial_snapshot(master: RunningMaster) -> None:
    await create(master.registry, "alpha", 0.2)
    await create(master.registry, "beta", 0.3)
    call = watch(master.registry)
    [first] = await take(call, 1)
    call.cancel()
    assert first.WhichOneof("payload") == "snapshot"
    assert first.snapshot.reason == Reason.SNAPSHOT_REASON_INITIAL
    assert [c.slug for c in first.snapshot.challenges] == ["alpha", "beta"]
    assert first.cursor.revision == 2
    assert len(first.cursor.server_epoch) == 16
    assert len(first.cursor.history_id) == 32


async def test_resume_delivers_exactly_the_missed_events(master: RunningMaster) -> None:
    await create(master.registry, "alpha", 0.2)
    call = watch(master.registry)
    [snapshot] = await take(call, 1)
    call.cancel()
    cursor = snapshot.cursor

    # Missed while disconnected: a create, an update, a status change, a delete.
    await create(master.registry, "beta", 0.3)
    await set_status(master.registry, "alpha", ACTIVE)
    await set_status(master.registry, "alpha", INACTIVE)
    await master.registry.DeleteChallenge(
        registry_pb2.DeleteChallengeRequest(slug="beta"), metadata=ADMIN
    )

    call = watch(master.registry, cursor.revision, cursor.history_id)
    missed = await take(call, 4)
    assert [m.WhichOneof("payload") for m in missed] == ["event"] * 4
    assert [m.event.revision for m in missed] == [2, 3, 4, 5]
    assert [m.cursor.revision for m in missed] == [2, 3, 4, 5]
    assert [(m.event.type, m.event.challenge.slug) for m in missed] == [
        (Event.TYPE_PUT, "beta"),
        (Event.TYPE_PUT, "alpha"),
        (Event.TYPE_PUT, "alpha"),
        (Event.TYPE_DELETE, "beta"),
    ]
    assert missed[1].event.challenge.status == ACTIVE
    assert missed[2].event.challenge.status == INACTIVE

    # Then live events, nothing replayed twice.
    await create(master.registry, "gamma", 0.1)
    [live] = await take(call, 1)
    call.cancel()
    assert live.event.revision == 6
    assert live.event.challenge.slug == "gamma"


async def test_up_to_date_watcher_gets_an_immediate_bookmark(master: RunningMaster) -> None:
    await create(master.registry, "alpha")
    call = watch(master.registry, 1)
    [first] = await take(call, 1)
    call.cancel()
    assert first.WhichOneof("payload") == "bookmark"
    assert first.cursor.revision == 1


async def test_quiet_stream_gets_periodic_bookmarks(database_url: str) -> None:
    running = await start_master(database_url, bookmark_interval=0.2)
    try:
        await create(running.registry, "alpha")
        call = watch(running.registry)
        messages = await take(call, 3, within=5)
        call.cancel()
        assert messages[0].WhichOneof("payload") == "snapshot"
        assert [m.WhichOneof("payload") for m in messages[1:]] == ["bookmark", "bookmark"]
        assert all(m.cursor.revision == 1 for m in messages)
    finally:
        await running.close()


@pytest.mark.parametrize(
    ("since", "history", "reason"),
    [
        (99, "", Reason.SNAPSHOT_REASON_UNKNOWN_REVISION),
        (1, "0" * 32, Reason.SNAPSHOT_REASON_UNKNOWN_REVISION),
    ],
)
async def test_unusable_revision_gets_a_resync_snapshot(
    master: RunningMaster, since: int, history: str, reason: int
) -> None:
    await create(master.registry, "alpha")
    await create(master.registry, "beta")
    call = watch(master.registry, since, history)
    [first] = await take(call, 1)
    call.cancel()
    assert first.snapshot.reason == reason
    assert [c.slug for c in first.snapshot.challenges] == ["alpha", "beta"]
    assert first.cursor.revision == 2


async def test_compacted_revision_gets_a_resync_snapshot(
    master: RunningMaster, database_url: str
) -> None:
    for slug in ("a1", "a2", "a3", "a4"):
        await create(master.registry, slug)
    engine = create_engine(database_url)
    try:
        assert await RegistryStore(engine, Policy(), TokenIssuer(bytes(32))).compact(keep=1) == 3
    finally:
        await engine.dispose()
    # This master still buffers the compacted events in memory and serves them.
    call = watch(master.registry, 1)
    assert [m.event.revision for m in await take(call, 3)] == [2, 3, 4]
    call.cancel()
    # A fresh master has only the compacted log: it must resync.
    fresh = await start_master(database_url)
    try:
        call = watch(fresh.registry, 1)
        [first] = await take(call, 1)
        call.cancel()
        assert first.snapshot.reason == Reason.SNAPSHOT_REASON_COMPACTED
        assert first.cursor.revision == 4
        assert len(first.snapshot.challenges) == 4
        # Revisions at or after the compaction point still resume exactly.
        call = watch(fresh.registry, 3)
        [event] = await take(call, 1)
        call.cancel()
        assert event.event.revision == 4
    finally:
        await fresh.close()


async def test_negative_revision_is_refused(master: RunningMaster) -> None:
    error = await refused(take(watch(master.registry, -1), 1), grpc.StatusCode.INVALID_ARGUMENT)
    assert "since_revision" in (error.details() or "")


async def test_watch_requires_credentials(master: RunningMaster) -> None:
    call = master.registry.WatchRegistry(registry_pb2.WatchRegistryRequest())
    await refused(take(call, 1), grpc.StatusCode.UNAUTHENTICATED)


async def test_writes_through_another_replica_reach_watchers(database_url: str) -> None:
    """Two masters on one database: a watcher on B sees writes made through A."""
    first = await start_master(database_url)
    second = await start_master(database_url)
    try:
        call = watch(second.registry)
        [snapshot] = await take(call, 1)
        await create(first.registry, "alpha", 0.4)
        await set_status(first.registry, "alpha", ACTIVE)
        events = await take(call, 2)
        call.cancel()
        assert [e.event.revision for e in events] == [
            snapshot.cursor.revision + 1,
            snapshot.cursor.revision + 2,
        ]
        assert events[1].event.challenge.status == ACTIVE
        assert first.master.port != second.master.port
    finally:
        await first.close()
        await second.close()


async def test_many_watchers_each_get_every_event_once(master: RunningMaster) -> None:
    calls = [watch(master.registry) for _ in range(25)]
    for call in calls:
        await take(call, 1)
    for i in range(5):
        await create(master.registry, f"c{i}")
    results = await asyncio.gather(*(take(call, 5) for call in calls))
    for call in calls:
        call.cancel()
    for events in results:
        assert [e.event.revision for e in events] == [1, 2, 3, 4, 5]
