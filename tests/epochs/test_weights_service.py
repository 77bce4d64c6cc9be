"""The Weights service over a real master, a real store and the local subnet."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from master.weights.epochs import EpochNotSealed
from platform_common import vectors
from platform_common.chain import dev_keypair
from platform_common.keys import load_signer
from platform_network.v1 import common_pb2, weights_pb2
from tests.epochs.conftest import MASTER_KEY, EpochMaster, Subnet, read, start_epoch_master
from tests.helpers import refused
from tests.support.master import ADMIN
from tests.support.waiting import eventually

Reason = common_pb2.SnapshotReason
Outcome = weights_pb2.SubmissionOutcome
VALIDATOR = dev_keypair("hotkey", 1).ss58_address
EXTRINSIC = "0x" + "ab" * 32


def report(sealed: weights_pb2.WeightVector, **fields: object) -> weights_pb2.SubmissionReport:
    values: dict[str, object] = {
        "report_id": "r-1",
        "epoch": sealed.epoch,
        "epoch_id": sealed.epoch_id,
        "validator_hotkey": VALIDATOR,
        "outcome": Outcome.SUBMISSION_OUTCOME_SUBMITTED,
        "block": 12,
        "extrinsic_hash": EXTRINSIC,
        "message": "set",
        "agent_version": "0.1.0",
    }
    values.update(fields)
    out = weights_pb2.SubmissionReport(**values)  # type: ignore[arg-type]
    if "occur_time" not in fields:
        out.occur_time.FromDatetime(datetime(2026, 11, 22, tzinfo=UTC))
    return out


async def test_nothing_sealed_yet(epoch_master: EpochMaster) -> None:
    error = await refused(
        epoch_master.weights.GetLatestWeights(
            weights_pb2.GetLatestWeightsRequest(), metadata=ADMIN
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    assert "no epoch has been sealed yet" in (error.details() or "")
    stream = epoch_master.weights.WatchWeights(
        weights_pb2.WatchWeightsRequest(since_epoch=0), metadata=ADMIN
    )
    first = await read(stream)
    stream.cancel()
    assert first.snapshot.reason == Reason.SNAPSHOT_REASON_INITIAL
    assert not first.snapshot.HasField("latest")
    assert first.cursor.revision == 0


async def test_an_epoch_without_challenges_pays_the_burn_uid_and_is_signed(
    epoch_master: EpochMaster, subnet: Subnet
) -> None:
    epoch = await epoch_master.seal()
    vector = epoch.vector
    assert vector.epoch == 1
    assert vector.netuid == 1
    assert [(w.uid, w.weight) for w in vector.weights] == [(0, 1.0)]
    assert vector.weights[0].hotkey == dev_keypair("hotkey", 0).ss58_address
    assert list(vector.chain_weights.uids) == [0]
    assert list(vector.chain_weights.values) == [65535]
    assert epoch.burn_weight == 1.0
    assert epoch.unallocated_share == 1.0
    assert epoch.metagraph_neurons == 16
    assert vector.policy == weights_pb2.SHARE_POLICY_BURN
    assert vector.expire_time.ToDatetime() > vector.create_time.ToDatetime()
    master_hotkey = load_signer(MASTER_KEY).ss58_address
    assert vector.master_hotkey == master_hotkey
    vectors.verify_vector(vector, master_hotkey)

    latest = await epoch_master.weights.GetLatestWeights(
        weights_pb2.GetLatestWeightsRequest(), metadata=ADMIN
    )
    assert latest == vector
    by_number = await epoch_master.weights.GetEpoch(
        weights_pb2.GetEpochRequest(epoch=1), metadata=ADMIN
    )
    by_id = await epoch_master.weights.GetEpoch(
        weights_pb2.GetEpochRequest(epoch_id=vector.epoch_id), metadata=ADMIN
    )
    assert by_number == by_id == epoch


async def test_get_epoch_and_list_epochs_refusals_and_paging(epoch_master: EpochMaster) -> None:
    for _ in range(3):
        await epoch_master.seal()
    weights = epoch_master.weights
    error = await refused(
        weights.GetEpoch(weights_pb2.GetEpochRequest(), metadata=ADMIN),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert error.details() == "selector: set exactly one of epoch or epoch_id"
    error = await refused(
        weights.GetEpoch(weights_pb2.GetEpochRequest(epoch=-2), metadata=ADMIN),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert error.details() == "epoch: must be >= 1; got -2"
    error = await refused(
        weights.GetEpoch(weights_pb2.GetEpochRequest(epoch=9), metadata=ADMIN),
        grpc.StatusCode.NOT_FOUND,
    )
    assert "epoch 9" in (error.details() or "")
    error = await refused(
        weights.GetEpoch(weights_pb2.GetEpochRequest(epoch_id=""), metadata=ADMIN),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert (error.details() or "").startswith("epoch_id: must be 1..64 characters")

    first = await weights.ListEpochs(weights_pb2.ListEpochsRequest(page_size=2), metadata=ADMIN)
    assert [e.epoch for e in first.epochs] == [3, 2]
    assert first.epochs[0].weight_count == 1
    assert first.epochs[0].burn_weight == 1.0
    second = await weights.ListEpochs(
        weights_pb2.ListEpochsRequest(page_size=2, page_token=first.next_page_token),
        metadata=ADMIN,
    )
    assert [e.epoch for e in second.epochs] == [1]
    assert second.next_page_token == ""
    error = await refused(
        weights.ListEpochs(weights_pb2.ListEpochsRequest(page_size=1001), metadata=ADMIN),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert error.details() == "page_size: must be 0..1000; got 1001"
    await refused(
        weights.ListEpochs(weights_pb2.ListEpochsRequest(page_token="%%%"), metadata=ADMIN),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


async def test_weights_rpcs_need_credentials(epoch_master: EpochMaster) -> None:
    await refused(
        epoch_master.weights.GetLatestWeights(weights_pb2.GetLatestWeightsRequest()),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    await refused(
        epoch_master.weights.ListSubmissions(
            weights_pb2.ListSubmissionsRequest(),
            metadata=(("authorization", "Bearer not-the-token-at-all"),),
        ),
        grpc.StatusCode.UNAUTHENTICATED,
    )


async def test_watch_weights_pushes_new_vectors_and_resumes(epoch_master: EpochMaster) -> None:
    weights = epoch_master.weights
    sealed = (await epoch_master.seal()).vector
    stream = weights.WatchWeights(weights_pb2.WatchWeightsRequest(since_epoch=0), metadata=ADMIN)
    snapshot = await read(stream)
    assert snapshot.snapshot.reason == Reason.SNAPSHOT_REASON_INITIAL
    assert snapshot.snapshot.latest == sealed
    history = snapshot.cursor.history_id
    assert snapshot.cursor.revision == 1
    second = await epoch_master.seal()
    pushed = await asyncio.wait_for(read(stream), 10)
    assert pushed.vector == second.vector
    assert pushed.cursor.revision == 2
    stream.cancel()

    await epoch_master.seal()
    resumed = weights.WatchWeights(
        weights_pb2.WatchWeightsRequest(since_epoch=1, history_id=history), metadata=ADMIN
    )
    replayed = [await read(resumed), await read(resumed)]
    assert [m.vector.epoch for m in replayed] == [2, 3]
    assert [m.cursor.revision for m in replayed] == [2, 3]
    resumed.cancel()

    current = weights.WatchWeights(
        weights_pb2.WatchWeightsRequest(since_epoch=3, history_id=history), metadata=ADMIN
    )
    bookmark = await read(current)
    assert bookmark.WhichOneof("payload") == "bookmark"
    assert bookmark.cursor.revision == 3
    current.cancel()

    for request in (
        weights_pb2.WatchWeightsRequest(since_epoch=7, history_id=history),
        weights_pb2.WatchWeightsRequest(since_epoch=2, history_id="another-history"),
        weights_pb2.WatchWeightsRequest(since_epoch=2),
    ):
        resync = weights.WatchWeights(request, metadata=ADMIN)
        message = await read(resync)
        resync.cancel()
        assert message.snapshot.reason == Reason.SNAPSHOT_REASON_UNKNOWN_REVISION, request
        assert message.snapshot.latest.epoch == 3
        assert message.cursor.revision == 3

    bad = weights.WatchWeights(weights_pb2.WatchWeightsRequest(since_epoch=-1), metadata=ADMIN)
    error = await refused(bad.read(), grpc.StatusCode.INVALID_ARGUMENT)
    assert error.details() == "since_epoch: must be 0 or positive; got -1"


async def test_report_submission_is_validated_idempotent_and_listed(
    epoch_master: EpochMaster,
) -> None:
    weights = epoch_master.weights
    vector = (await epoch_master.seal()).vector

    stored = await weights.ReportSubmission(
        weights_pb2.ReportSubmissionRequest(report=report(vector)), metadata=ADMIN
    )
    assert not stored.duplicate
    assert stored.submission.admin_reported
    assert stored.submission.report == report(vector)
    again = await weights.ReportSubmission(
        weights_pb2.ReportSubmissionRequest(report=report(vector)), metadata=ADMIN
    )
    assert again.duplicate
    assert again.submission == stored.submission
    error = await refused(
        weights.ReportSubmission(
            weights_pb2.ReportSubmissionRequest(report=report(vector, message="changed")),
            metadata=ADMIN,
        ),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert "report.report_id: 'r-1'" in (error.details() or "")

    cases = {
        "report.report_id: must be 1..64 characters of [A-Za-z0-9_-]; got 'a b'": report(
            vector, report_id="a b"
        ),
        "report.validator_hotkey: not a valid SS58 address": report(
            vector, validator_hotkey="5notanaddress"
        ),
        "report.outcome: must be a known outcome other than UNSPECIFIED; got 0": report(
            vector, outcome=0
        ),
        "report.block: must be > 0 for SUBMITTED, COMMITTED and REVEALED; got 0": report(
            vector, block=0
        ),
        "report.extrinsic_hash: must be 0x followed by 64 lowercase hex digits": report(
            vector, extrinsic_hash="0xAB"
        ),
        "report.epoch: must be >= 1; got 0": report(vector, epoch=0),
    }
    for expected, bad in cases.items():
        error = await refused(
            weights.ReportSubmission(
                weights_pb2.ReportSubmissionRequest(report=bad), metadata=ADMIN
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert (error.details() or "").startswith(expected), error.details()
    missing_time = report(vector, report_id="r-2")
    missing_time.ClearField("occur_time")
    error = await refused(
        weights.ReportSubmission(
            weights_pb2.ReportSubmissionRequest(report=missing_time), metadata=ADMIN
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert error.details() == "report.occur_time: is required"
    await refused(
        weights.ReportSubmission(weights_pb2.ReportSubmissionRequest(), metadata=ADMIN),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    error = await refused(
        weights.ReportSubmission(
            weights_pb2.ReportSubmissionRequest(report=report(vector, report_id="r-3", epoch=5)),
            metadata=ADMIN,
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    assert "report.epoch: no epoch 5" in (error.details() or "")
    error = await refused(
        weights.ReportSubmission(
            weights_pb2.ReportSubmissionRequest(
                report=report(vector, report_id="r-4", epoch_id="0" * 32)
            ),
            metadata=ADMIN,
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert "report.epoch_id" in (error.details() or "")

    skipped = report(
        vector,
        report_id="r-5",
        outcome=Outcome.SUBMISSION_OUTCOME_SKIPPED_STALE,
        block=0,
        extrinsic_hash="",
    )
    await weights.ReportSubmission(
        weights_pb2.ReportSubmissionRequest(report=skipped), metadata=ADMIN
    )
    listed = await weights.ListSubmissions(
        weights_pb2.ListSubmissionsRequest(page_size=1), metadata=ADMIN
    )
    assert [s.report.report_id for s in listed.submissions] == ["r-5"]
    rest = await weights.ListSubmissions(
        weights_pb2.ListSubmissionsRequest(page_size=1, page_token=listed.next_page_token),
        metadata=ADMIN,
    )
    assert [s.report.report_id for s in rest.submissions] == ["r-1"]
    assert rest.next_page_token == ""
    only_skips = await weights.ListSubmissions(
        weights_pb2.ListSubmissionsRequest(
            outcomes=[Outcome.SUBMISSION_OUTCOME_SKIPPED_STALE], validator_hotkey=VALIDATOR
        ),
        metadata=ADMIN,
    )
    assert [s.report.report_id for s in only_skips.submissions] == ["r-5"]
    error = await refused(
        weights.ListSubmissions(
            weights_pb2.ListSubmissionsRequest(
                page_size=1, epoch=1, page_token=listed.next_page_token
            ),
            metadata=ADMIN,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "page_token" in (error.details() or "")
    error = await refused(
        weights.ListSubmissions(
            weights_pb2.ListSubmissionsRequest(epoch=-1, validator_hotkey="x"), metadata=ADMIN
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "epoch: must be 0 or positive; got -1" in (error.details() or "")
    assert "validator_hotkey: not a valid SS58 address" in (error.details() or "")


async def test_reports_per_validator_and_epoch_are_bounded(epoch_master: EpochMaster) -> None:
    vector = (await epoch_master.seal()).vector
    for index in range(32):
        await epoch_master.weights.ReportSubmission(
            weights_pb2.ReportSubmissionRequest(report=report(vector, report_id=f"r{index}")),
            metadata=ADMIN,
        )
    error = await refused(
        epoch_master.weights.ReportSubmission(
            weights_pb2.ReportSubmissionRequest(report=report(vector, report_id="r32")),
            metadata=ADMIN,
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert "at most 32 reports per validator and epoch" in (error.details() or "")


async def test_sealed_epochs_survive_a_restart(
    database_url: str, subnet: Subnet, token_key_file: Path
) -> None:
    first = await start_epoch_master(database_url, subnet, token_key_file)
    try:
        sealed = [(await first.seal()).vector for _ in range(2)]
    finally:
        await first.close()
    second = await start_epoch_master(database_url, subnet, token_key_file)
    try:
        latest = await second.weights.GetLatestWeights(
            weights_pb2.GetLatestWeightsRequest(), metadata=ADMIN
        )
        assert latest == sealed[-1]
        assert (await second.seal()).vector.epoch == 3
    finally:
        await second.close()


async def latest(master: EpochMaster) -> weights_pb2.WeightVector:
    return await master.weights.GetLatestWeights(
        weights_pb2.GetLatestWeightsRequest(), metadata=ADMIN
    )


async def test_replicas_serve_the_epochs_the_others_seal(
    database_url: str, subnet: Subnet, token_key_file: Path
) -> None:
    """Two masters on one database: each one serves, and streams, what the other sealed."""
    poll = {"feed_poll_interval": 0.1}
    first = await start_epoch_master(database_url, subnet, token_key_file, **poll)
    second = await start_epoch_master(database_url, subnet, token_key_file, **poll)
    try:
        stream = second.weights.WatchWeights(
            weights_pb2.WatchWeightsRequest(since_epoch=0), metadata=ADMIN
        )
        assert not (await read(stream)).snapshot.HasField("latest")
        sealed = (await first.seal()).vector
        pushed = await asyncio.wait_for(read(stream), 10)
        assert pushed.vector == sealed
        assert await latest(second) == sealed

        # The other way round.
        other = (await second.seal()).vector
        assert other.epoch == sealed.epoch + 1

        async def first_serves_it() -> bool:
            return await latest(first) == other

        await eventually(first_serves_it, "the first master serves the second one's epoch")
        assert (await asyncio.wait_for(read(stream), 10)).vector == other
        stream.cancel()
    finally:
        await second.close()
        await first.close()


async def test_a_replica_that_loses_the_race_for_an_epoch_serves_the_winners_vector(
    database_url: str, subnet: Subnet, token_key_file: Path
) -> None:
    # No polling in this test's time: whatever a master serves, it learned when sealing.
    slow = {"feed_poll_interval": 3600.0}
    masters = [await start_epoch_master(database_url, subnet, token_key_file, **slow)]
    masters.append(await start_epoch_master(database_url, subnet, token_key_file, **slow))
    try:
        for _ in range(3):
            outcomes = await asyncio.gather(*(m.seal() for m in masters), return_exceptions=True)
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    assert isinstance(outcome, EpochNotSealed), outcome
                    assert outcome.outcome == "taken", outcome
            sealed = [o.vector for o in outcomes if not isinstance(o, BaseException)]
            newest = max(sealed, key=lambda v: v.epoch)
            if len(sealed) == 1:
                # The loser read the winner's vector the moment its insert was refused.
                assert [await latest(m) for m in masters] == [newest, newest]
            else:
                # No race this time: the two sealed one epoch after the other.
                assert sorted(v.epoch for v in sealed) == [newest.epoch - 1, newest.epoch]
    finally:
        for master in masters:
            await master.close()


@pytest.mark.parametrize("policy", ["burn", "redistribute"])
async def test_the_configured_policy_is_recorded(
    database_url: str, subnet: Subnet, token_key_file: Path, policy: str
) -> None:
    running = await start_epoch_master(
        database_url, subnet, token_key_file, share_policy=policy, burn_uid=3
    )
    try:
        vector = (await running.seal()).vector
    finally:
        await running.close()
    assert vector.policy == (
        weights_pb2.SHARE_POLICY_BURN if policy == "burn" else weights_pb2.SHARE_POLICY_REDISTRIBUTE
    )
    assert vector.burn_uid == 3
    assert [(w.uid, w.weight) for w in vector.weights] == [(3, 1.0)]
