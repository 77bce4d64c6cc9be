"""The agent's store on SQLite and PostgreSQL: each epoch claimed at most once, outcomes
and reports written together, positions that survive a restart."""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy import text

from platform_network.v1 import registry_pb2, weights_pb2
from tests.validator.support import make_vector
from validator.reports import ReportFactory
from validator.store import (
    DONE,
    PENDING,
    QUEUED,
    REPORT_QUEUED,
    REPORT_SENT,
    Cursor,
    Result,
    Store,
    StoreError,
)
from validator.verify import Position

Outcome = weights_pb2.SubmissionOutcome
FACTORY = ReportFactory("5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty", version="test")
SUBMITTED = Result(Outcome.SUBMISSION_OUTCOME_SUBMITTED, "set", 12, "0x" + "ab" * 32)


def report(vector: weights_pb2.WeightVector, result: Result) -> weights_pb2.SubmissionReport:
    return FACTORY.make(vector.epoch, vector.epoch_id, result, time.time_ns())


async def test_an_epoch_is_queued_claimed_and_finished_once(store: Store) -> None:
    vector = make_vector(1)
    assert await store.accept(vector, Cursor("history-a", 1))
    assert not await store.accept(vector), "the same epoch is never queued twice"
    assert [v.epoch_id for v in await store.queued()] == [vector.epoch_id]
    assert await store.cursor("weights") == Cursor("history-a", 1)

    assert await store.claim(vector) == "claimed"
    assert await store.claim(vector) == "taken"
    assert await store.queued() == []
    [pending] = await store.pending()
    assert (pending.epoch_id, pending.state) == (vector.epoch_id, PENDING)
    assert await store.last_claimed() == Position.of(vector)

    first = report(vector, SUBMITTED)
    assert await store.finish(vector.epoch_id, SUBMITTED, first)
    assert not await store.finish(vector.epoch_id, SUBMITTED, report(vector, SUBMITTED))
    record = await store.epoch(vector.epoch_id)
    assert record is not None
    assert (record.state, record.outcome, record.block) == (
        DONE,
        Outcome.SUBMISSION_OUTCOME_SUBMITTED,
        12,
    )
    assert record.vector is None
    [stored] = await store.reports()
    assert stored.report == first
    assert stored.state == REPORT_QUEUED


async def test_an_older_epoch_cannot_be_claimed_after_a_newer_one(store: Store) -> None:
    old, new = make_vector(1), make_vector(2)
    for vector in (old, new):
        assert await store.accept(vector)
    assert [v.epoch for v in await store.queued()] == [2, 1]
    assert await store.claim(new) == "claimed"
    assert await store.claim(old) == "not_newer"
    # Handed back (a shutdown during a wait), the same epoch can be claimed again.
    assert await store.unclaim(new.epoch_id)
    assert await store.claim(new) == "claimed"


async def test_concurrent_claims_of_one_epoch_let_exactly_one_through(store_url: str) -> None:
    stores = [await Store.open(store_url) for _ in range(3)]
    try:
        vector = make_vector(7)
        assert await stores[0].accept(vector)
        results = await asyncio.gather(*(s.claim(vector) for s in stores))
        assert sorted(results) == ["claimed", "taken", "taken"]
    finally:
        for opened in stores:
            await opened.close()


async def test_a_refused_vector_takes_its_epoch_and_its_report_is_queued(store: Store) -> None:
    vector = make_vector(3)
    stale = Result(Outcome.SUBMISSION_OUTCOME_SKIPPED_STALE, "expired")
    assert await store.record(vector, stale, report(vector, stale), Cursor("history-a", 3))
    assert not await store.record(vector, stale, report(vector, stale))
    assert not await store.accept(vector), "a closed epoch is never queued again"
    assert len(await store.reports()) == 1
    record = await store.epoch(vector.epoch_id)
    assert record is not None
    assert record.state == DONE


async def test_an_inauthentic_vector_gets_a_report_but_no_epoch_row(store: Store) -> None:
    vector = make_vector(4)
    invalid = Result(Outcome.SUBMISSION_OUTCOME_REJECTED_INVALID, "signature")
    await store.record_inauthentic(report(vector, invalid))
    assert await store.epoch(vector.epoch_id) is None
    # The real epoch of that id is not blocked by the forgery.
    assert await store.accept(vector)


async def test_reports_leave_the_outbox_in_order_once_sent(store: Store) -> None:
    vectors = [make_vector(n) for n in (1, 2, 3)]
    for vector in vectors:
        await store.accept(vector)
        await store.finish(vector.epoch_id, SUBMITTED, report(vector, SUBMITTED))
    unsent = await store.unsent_reports()
    assert [r.report.epoch for r in unsent] == [1, 2, 3]
    await store.mark_report(unsent[0].report_id, REPORT_SENT)
    await store.mark_report(unsent[1].report_id, REPORT_QUEUED, "UNAVAILABLE: down")
    left = await store.unsent_reports()
    assert [r.report.epoch for r in left] == [2, 3]
    assert (left[0].attempts, left[0].last_error) == (1, "UNAVAILABLE: down")
    assert await store.count_unsent_reports() == 2
    # A batch is bounded, the count is not.
    assert [r.report.epoch for r in await store.unsent_reports(1)] == [2]


async def test_the_last_submitted_epoch_counts_submitted_and_committed_only(store: Store) -> None:
    assert await store.last_submitted_epoch() == 0
    committed = Result(Outcome.SUBMISSION_OUTCOME_COMMITTED, "committed", 7, "0x" + "cd" * 32)
    failed = Result(Outcome.SUBMISSION_OUTCOME_FAILED, "refused")
    for epoch, result in ((2, SUBMITTED), (5, committed), (9, failed)):
        vector = make_vector(epoch)
        await store.accept(vector)
        await store.finish(vector.epoch_id, result, report(vector, result))
    assert await store.last_submitted_epoch() == 5


async def test_everything_survives_a_reopen(store_url: str) -> None:
    first = await Store.open(store_url)
    done, claimed, waiting = make_vector(1), make_vector(2), make_vector(3)
    try:
        for vector in (done, claimed, waiting):
            await first.accept(vector, Cursor("history-a", vector.epoch))
        await first.claim(done)
        await first.finish(done.epoch_id, SUBMITTED, report(done, SUBMITTED))
        await first.claim(claimed)
        challenge = registry_pb2.Challenge(slug="alpha", name="Alpha", revision=4)
        await first.apply_registry(Cursor("history-a", 4), snapshot=[challenge])
    finally:
        await first.close()

    second = await Store.open(store_url)
    try:
        assert await second.cursor("weights") == Cursor("history-a", 3)
        assert await second.cursor("registry") == Cursor("history-a", 4)
        assert await second.last_claimed() == Position.of(claimed)
        assert [r.epoch_id for r in await second.pending()] == [claimed.epoch_id]
        assert [v.epoch_id for v in await second.queued()] == [waiting.epoch_id]
        assert [c.slug for c in await second.challenges()] == ["alpha"]
        assert [r.epoch for r in await second.epochs()] == [1, 2, 3]
        assert [r.state for r in await second.epochs()] == [DONE, PENDING, QUEUED]
    finally:
        await second.close()


async def test_registry_events_apply_on_top_of_a_snapshot(store: Store) -> None:
    alpha = registry_pb2.Challenge(slug="alpha", revision=1)
    beta = registry_pb2.Challenge(slug="beta", revision=2)
    await store.apply_registry(Cursor("h", 2), snapshot=[alpha, beta])
    changed = registry_pb2.Challenge(slug="alpha", revision=3, name="Alpha 2")
    await store.apply_registry(Cursor("h", 3), put=changed)
    await store.apply_registry(Cursor("h", 4), delete_slug="beta")
    assert await store.challenges() == [changed]
    assert await store.cursor("registry") == Cursor("h", 4)
    await store.apply_registry(Cursor("h", 5), snapshot=[])
    assert await store.challenges() == []


async def test_a_store_from_a_newer_schema_is_refused(store_url: str) -> None:
    opened = await Store.open(store_url)
    try:
        engine = opened._engine
        async with engine.begin() as conn:
            await conn.execute(
                text("UPDATE validator_state SET value = '99' WHERE key = 'schema_version'")
            )
    finally:
        await opened.close()
    with pytest.raises(StoreError, match="schema version 99"):
        await Store.open(store_url)
