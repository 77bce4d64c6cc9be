"""The submitter on the local simulated subnet under the real Bittensor SDK: what lands on
chain, the weights rate limit, expiry, superseding, crash recovery, shutdown."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from platform_common.chain import Chain, ChainWeights, SubmitResult
from platform_network.v1 import weights_pb2
from tests.support.waiting import eventually
from tests.validator.conftest import LocalChain
from tests.validator.support import NS, VALIDATOR_KEY, ChainInFront, make_vector, signer
from validator.reports import ReportFactory
from validator.store import DONE, QUEUED, EpochRecord, Store
from validator.submit import UNKNOWN_AFTER_STOP, SubmitSettings, Submitter
from validator.telemetry import SUBMITTED_EPOCH

Outcome = weights_pb2.SubmissionOutcome
HOTKEY = signer(VALIDATOR_KEY).ss58_address
FIRST = ((0, 0.5), (2, 0.5))
SECOND = ((0, 0.25), (3, 0.75))
THIRD = ((1, 0.5), (4, 0.5))


@dataclass
class Harness:
    store: Store
    local: LocalChain
    reports: int = 0
    submitter: Submitter | None = None
    task: asyncio.Task[None] | None = None

    def start(
        self, key: str = VALIDATOR_KEY, attempts: int = 3, chain: Chain | None = None
    ) -> Submitter:
        def reported() -> None:
            self.reports += 1

        self.submitter = Submitter(
            self.store,
            chain or self.local.chain,
            signer(key).keypair,
            ReportFactory(signer(key).ss58_address, version="test"),
            SubmitSettings(mechanism_id=0, attempts=attempts, retry_delay=0.05, poll_interval=0.05),
            on_report=reported,
        )
        self.task = asyncio.create_task(self.submitter.run())
        return self.submitter

    async def stop(self) -> None:
        if self.submitter is not None and self.task is not None:
            self.submitter.stop_soon()
            await asyncio.wait_for(self.task, 10)
            self.submitter = self.task = None

    async def queue(self, vector: weights_pb2.WeightVector) -> None:
        assert await self.store.accept(vector)
        if self.submitter is not None:
            self.submitter.wake()

    async def outcome(self, vector: weights_pb2.WeightVector) -> EpochRecord:
        async def done() -> EpochRecord | None:
            record = await self.store.epoch(vector.epoch_id)
            return record if record is not None and record.state == DONE else None

        record: EpochRecord = await eventually(done, what=f"an outcome for epoch {vector.epoch}")
        return record

    async def row(self) -> tuple[int, tuple[int, ...], tuple[int, ...]] | None:
        row = await self.local.subnet.weights_set(HOTKEY)
        return None if row is None else (row.block, row.uids, row.values)

    async def extrinsics(self, hotkey: str = HOTKEY) -> int:
        return await self.local.subnet.next_nonce(hotkey)


@pytest.fixture
async def harness(local_chain: LocalChain, tmp_path: Path) -> AsyncIterator[Harness]:
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'validator.db'}")
    running = Harness(store, local_chain)
    try:
        yield running
    finally:
        await running.stop()
        await store.close()


async def test_a_vector_is_set_on_chain_exactly_as_signed(harness: Harness) -> None:
    vector = make_vector(1, weights=FIRST)
    await harness.queue(vector)
    harness.start()
    record = await harness.outcome(vector)
    assert record.outcome == Outcome.SUBMISSION_OUTCOME_SUBMITTED
    assert record.block == 5
    assert record.extrinsic_hash.startswith("0x")
    assert len(record.extrinsic_hash) == 66
    assert await harness.row() == (5, (0, 2), (65535, 65535))
    assert tuple(vector.chain_weights.values) == (65535, 65535)
    [report] = await harness.store.reports()
    assert report.report.outcome == Outcome.SUBMISSION_OUTCOME_SUBMITTED
    assert report.report.block == 5
    assert report.report.validator_hotkey == HOTKEY
    assert await harness.extrinsics() == 1


async def test_a_rate_limited_submission_waits_for_the_allowed_block(harness: Harness) -> None:
    submitter = harness.start()
    first, second = make_vector(1, weights=FIRST), make_vector(2, weights=SECOND)
    await harness.queue(first)
    await harness.outcome(first)
    await harness.queue(second)

    async def waiting() -> int:
        return submitter.waiting_for_block

    assert await eventually(waiting, what="a wait for the rate limit") == 15
    await harness.local.subnet.advance(9)  # block 14: still too early
    await asyncio.sleep(0.2)
    record = await harness.store.epoch(second.epoch_id)
    assert record is not None
    assert record.state != DONE
    assert await harness.row() == (5, (0, 2), (65535, 65535))

    await harness.local.subnet.advance(1)
    record = await harness.outcome(second)
    assert record.outcome == Outcome.SUBMISSION_OUTCOME_SUBMITTED
    assert record.block == 15
    assert await harness.row() == (15, (0, 3), (21845, 65535))
    assert await harness.extrinsics() == 2


async def test_a_vector_that_expires_while_rate_limited_is_never_submitted(
    harness: Harness,
) -> None:
    submitter = harness.start()
    first = make_vector(1, weights=FIRST)
    await harness.queue(first)
    await harness.outcome(first)
    brief = make_vector(2, weights=SECOND, lifetime=1.5)
    await harness.queue(brief)

    async def waiting() -> int:
        return submitter.waiting_for_block

    await eventually(waiting, what="a wait for the rate limit")
    record = await harness.outcome(brief)
    assert record.outcome == Outcome.SUBMISSION_OUTCOME_RATE_LIMITED
    assert "block 15" in record.message
    assert "nothing was submitted" in record.message
    await harness.local.subnet.advance(20)
    assert await harness.row() == (5, (0, 2), (65535, 65535))
    assert await harness.extrinsics() == 1


async def test_a_newer_vector_supersedes_one_waiting_for_the_rate_limit(harness: Harness) -> None:
    submitter = harness.start()
    first, second, third = (
        make_vector(1, weights=FIRST),
        make_vector(2, weights=SECOND),
        make_vector(3, weights=THIRD),
    )
    await harness.queue(first)
    await harness.outcome(first)
    await harness.queue(second)

    async def waiting_for_second() -> bool:
        in_flight = submitter.in_flight
        return in_flight is not None and in_flight.epoch == 2 and submitter.waiting_for_block > 0

    await eventually(waiting_for_second, what="epoch 2 waiting for the rate limit")
    await harness.queue(third)
    record = await harness.outcome(second)
    assert record.outcome == Outcome.SUBMISSION_OUTCOME_SKIPPED_SUPERSEDED
    await harness.local.subnet.advance(10)
    record = await harness.outcome(third)
    assert record.outcome == Outcome.SUBMISSION_OUTCOME_SUBMITTED
    assert await harness.row() == (15, (1, 4), (65535, 65535))
    assert await harness.extrinsics() == 2


async def test_changed_hyperparameters_make_the_vector_invalid(harness: Harness) -> None:
    await harness.local.subnet.set_hyperparameters(weights_version=3)
    vector = make_vector(1, weights=FIRST)
    await harness.queue(vector)
    harness.start()
    record = await harness.outcome(vector)
    assert record.outcome == Outcome.SUBMISSION_OUTCOME_REJECTED_INVALID
    assert "version key is 3" in record.message
    assert await harness.row() is None
    assert await harness.extrinsics() == 0


async def test_a_refused_extrinsic_is_retried_then_reported_failed(harness: Harness) -> None:
    no_permit = "//platform-dev/hotkey/6"  # registered, no validator permit
    vector = make_vector(1, weights=FIRST)
    await harness.queue(vector)
    harness.start(key=no_permit, attempts=2)
    record = await harness.outcome(vector)
    assert record.outcome == Outcome.SUBMISSION_OUTCOME_FAILED
    assert "NeuronNoValidatorPermit" in record.message
    assert await harness.extrinsics(signer(no_permit).ss58_address) == 2


async def test_an_epoch_left_pending_by_a_crash_is_never_submitted_again(
    harness: Harness,
) -> None:
    vector = make_vector(1, weights=FIRST)
    await harness.queue(vector)
    assert await harness.store.claim(vector) == "claimed"  # then the agent died
    harness.start()
    record = await harness.outcome(vector)
    assert record.outcome == Outcome.SUBMISSION_OUTCOME_FAILED
    assert record.message == UNKNOWN_AFTER_STOP
    assert harness.reports >= 1
    # A newer epoch is still submitted.
    newer = make_vector(2, weights=SECOND)
    await harness.queue(newer)
    assert (await harness.outcome(newer)).outcome == Outcome.SUBMISSION_OUTCOME_SUBMITTED
    assert await harness.extrinsics() == 1
    # A restarted agent knows its newest submitted epoch, in /healthz and the gauge alike.
    await harness.stop()
    SUBMITTED_EPOCH.set(0)
    restarted = harness.start()

    async def recovered() -> bool:
        gauge = REGISTRY.get_sample_value("platform_validator_submitted_epoch")
        return restarted.submitted_epoch == 2 and gauge == 2

    await eventually(recovered, what="the submitted epoch recovered from the store")


async def test_a_shutdown_during_a_wait_hands_the_epoch_back(harness: Harness) -> None:
    submitter = harness.start()
    first, second = make_vector(1, weights=FIRST), make_vector(2, weights=SECOND)
    await harness.queue(first)
    await harness.outcome(first)
    await harness.queue(second)

    async def waiting() -> int:
        return submitter.waiting_for_block

    await eventually(waiting, what="a wait for the rate limit")
    await harness.stop()
    record = await harness.store.epoch(second.epoch_id)
    assert record is not None
    assert record.state == QUEUED
    assert await harness.store.pending() == []

    await harness.local.subnet.advance(10)
    harness.start()  # the restarted agent
    record = await harness.outcome(second)
    assert record.outcome == Outcome.SUBMISSION_OUTCOME_SUBMITTED


async def test_an_expired_queued_vector_is_skipped(harness: Harness) -> None:
    old = make_vector(1, weights=FIRST, created_ns=time.time_ns() - 20 * NS, lifetime=10)
    await harness.queue(old)
    harness.start()
    record = await harness.outcome(old)
    assert record.outcome == Outcome.SUBMISSION_OUTCOME_SKIPPED_STALE
    assert await harness.extrinsics() == 0


class LostAnswer(ChainInFront):
    """The real chain, except that the answer to the first set_weights is lost: the
    extrinsic lands, and the caller gets an error."""

    def __init__(self, chain: Chain) -> None:
        super().__init__(chain)
        self.lost = False

    async def set_weights(
        self, keypair: Any, weights: ChainWeights, *, mechanism_id: int = 0
    ) -> SubmitResult:
        result = await super().set_weights(keypair, weights, mechanism_id=mechanism_id)
        if not self.lost:
            self.lost = True
            raise TimeoutError("the connection dropped before the answer")
        return result


async def test_a_failed_attempt_that_did_land_is_not_submitted_again(harness: Harness) -> None:
    vector = make_vector(1, weights=FIRST)
    await harness.queue(vector)
    harness.start(chain=LostAnswer(harness.local.chain))
    record = await harness.outcome(vector)
    assert record.outcome == Outcome.SUBMISSION_OUTCOME_FAILED
    assert "an earlier attempt reached the chain" in record.message
    assert "block 5" in record.message
    assert await harness.row() == (5, (0, 2), (65535, 65535))
    assert await harness.extrinsics() == 1
