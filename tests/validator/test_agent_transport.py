"""The agent's side of the wire against a scripted master on real gRPC: signed calls,
streams resumed from the stored position after a break and after a restart, refusals
reported, reports retried with the same bytes until acknowledged, a refused stream
retried, clock skew warned about, and a submission cut off by the shutdown grace."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from platform_common import callauth
from platform_common.chain import Chain, ChainWeights, SubmitResult
from platform_network.v1 import common_pb2, weights_pb2, weights_pb2_grpc
from tests.support.waiting import eventually
from tests.validator.conftest import LocalChain
from tests.validator.fake_master import FakeMaster, Script, snapshot_message, vector_message
from tests.validator.support import (
    NS,
    VALIDATOR_KEY,
    ChainInFront,
    agent_config,
    make_vector,
    signer,
)
from validator.agent import Agent
from validator.reports import Reporter, ReportFactory
from validator.store import DONE, REPORT_DROPPED, REPORT_SENT, EpochRecord, Result, Store
from validator.streams import Backoff
from validator.submit import UNKNOWN_AFTER_STOP

Outcome = weights_pb2.SubmissionOutcome
Reason = common_pb2.SnapshotReason
HOTKEY = signer(VALIDATOR_KEY).ss58_address


@pytest.fixture
async def fake() -> AsyncIterator[FakeMaster]:
    master = FakeMaster(Script())
    await master.start()
    try:
        yield master
    finally:
        await master.stop()


async def outcomes(store: Store) -> dict[int, int]:
    return {r.epoch: r.outcome for r in await store.epochs() if r.state == DONE and r.outcome}


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def test_streams_resume_from_the_stored_position_after_a_break_and_a_restart(
    fake: FakeMaster, local_chain: LocalChain, tmp_path: Path
) -> None:
    first, second = make_vector(1), make_vector(2, weights=((0, 0.5), (3, 0.5)))
    fake.script.weights_streams = [
        [snapshot_message(first, Reason.SNAPSHOT_REASON_INITIAL)],
        [vector_message(second)],
    ]
    # The first stream breaks once epoch 1 is submitted (else epoch 2 could replace it).
    fake.script.hold = asyncio.Event()
    config = agent_config(
        master=fake.address,
        chain=local_chain.url,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'validator.db'}",
        metrics_listen="127.0.0.1:0",
    )
    agent = Agent(config)
    await agent.start()
    try:
        assert agent.store is not None
        store = agent.store
        first_outcome = await eventually(lambda: _outcome(store, first), what="epoch 1 submitted")
        assert first_outcome == Outcome.SUBMISSION_OUTCOME_SUBMITTED
        fake.script.hold.set()

        async def both_seen() -> bool:
            return len(fake.script.weights_requests) >= 3

        await eventually(both_seen, what="two reconnects")
        requests = [(r.since_epoch, r.history_id) for r in fake.script.weights_requests[:3]]
        assert requests == [(0, ""), (1, "history-a"), (2, "history-a")]
        assert set(fake.script.signers) == {HOTKEY}

        status, body = await asyncio.to_thread(
            get, f"http://127.0.0.1:{agent.metrics_port}/healthz"
        )
        health = json.loads(body)
        assert status == 200, health
        assert health["status"] == "ok"
        assert health["latest_epoch"] == 2
        assert health["submitted_epoch"] == 1
        status, body = await asyncio.to_thread(
            get, f"http://127.0.0.1:{agent.metrics_port}/metrics"
        )
        assert status == 200
        assert b"platform_validator_outcomes_total" in body
        assert b'platform_validator_stream_snapshots_total{reason="SNAPSHOT_REASON_INITIAL"' in body
    finally:
        await agent.stop()
    assert agent.health()[0] is False

    # A restarted agent asks for what follows epoch 2, with a new signature.
    seen = len(fake.script.weights_requests)
    again = Agent(config)
    await again.start()
    try:

        async def reconnected() -> bool:
            return len(fake.script.weights_requests) > seen

        await eventually(reconnected, what="the restarted agent's stream")
        latest = fake.script.weights_requests[seen]
        assert (latest.since_epoch, latest.history_id) == (2, "history-a")
    finally:
        await again.stop()


async def _outcome(store: Store, vector: weights_pb2.WeightVector) -> int | None:
    record = await store.epoch(vector.epoch_id)
    return record.outcome if record is not None and record.state == DONE else None


async def test_bad_signature_wrong_netuid_and_old_epoch_are_refused_and_reported(
    fake: FakeMaster, local_chain: LocalChain, tmp_path: Path
) -> None:
    good = make_vector(5, created_ns=time.time_ns() - 5 * NS)
    forged = make_vector(6)
    forged.chain_weights.values[0] = 1000  # changed after signing
    elsewhere = make_vector(7, netuid=2)
    # A reset master history whose latest vector is older than epoch 5.
    old = make_vector(3, history_id="history-b", created_ns=time.time_ns() - 60 * NS)
    fake.script.weights_streams = [
        [
            snapshot_message(good, Reason.SNAPSHOT_REASON_INITIAL),
            vector_message(forged),
            vector_message(elsewhere),
        ],
        [snapshot_message(old, Reason.SNAPSHOT_REASON_UNKNOWN_REVISION, "history-b")],
    ]
    # The reset history arrives once epoch 5 is taken for submission.
    fake.script.hold = asyncio.Event()
    agent = Agent(
        agent_config(
            master=fake.address,
            chain=local_chain.url,
            database_url=f"sqlite+aiosqlite:///{tmp_path / 'validator.db'}",
        )
    )
    await agent.start()
    try:
        assert agent.store is not None
        store = agent.store
        await eventually(lambda: _outcome(store, good), what="epoch 5 submitted")
        fake.script.hold.set()

        async def four_reports() -> bool:
            return len(fake.script.reports) >= 4

        await eventually(four_reports, what="four reports delivered")
        reports = [weights_pb2.SubmissionReport.FromString(r) for r in fake.script.reports]
        by_epoch = {r.epoch: r for r in reports}
        assert by_epoch[5].outcome == Outcome.SUBMISSION_OUTCOME_SUBMITTED
        assert by_epoch[6].outcome == Outcome.SUBMISSION_OUTCOME_REJECTED_INVALID
        assert by_epoch[6].message.startswith("signature:")
        assert by_epoch[7].outcome == Outcome.SUBMISSION_OUTCOME_REJECTED_INVALID
        assert by_epoch[7].message.startswith("netuid:")
        assert by_epoch[3].outcome == Outcome.SUBMISSION_OUTCOME_SKIPPED_STALE
        assert "not newer than epoch 5" in by_epoch[3].message
        assert {r.validator_hotkey for r in reports} == {HOTKEY}

        # The forgery holds no epoch row: only authentic epochs do.
        assert await outcomes(store) == {
            3: Outcome.SUBMISSION_OUTCOME_SKIPPED_STALE,
            5: Outcome.SUBMISSION_OUTCOME_SUBMITTED,
            7: Outcome.SUBMISSION_OUTCOME_REJECTED_INVALID,
        }
        row = await local_chain.subnet.weights_set(HOTKEY)
        assert row is not None
        assert row.uids == tuple(good.chain_weights.uids)
        assert await local_chain.subnet.next_nonce(HOTKEY) == 1
    finally:
        await agent.stop()


async def test_reports_are_resent_identically_until_acknowledged(
    fake: FakeMaster, tmp_path: Path
) -> None:
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'validator.db'}")
    channel = grpc.aio.insecure_channel(fake.address)
    stub = weights_pb2_grpc.WeightsStub(channel)
    method = "/platform_network.v1.Weights/ReportSubmission"

    async def send(report: weights_pb2.SubmissionReport) -> weights_pb2.ReportSubmissionResponse:
        request = weights_pb2.ReportSubmissionRequest(report=report)
        response: weights_pb2.ReportSubmissionResponse = await stub.ReportSubmission(
            request, metadata=callauth.sign_call(signer(VALIDATOR_KEY), method, request)
        )
        return response

    try:
        factory = ReportFactory(HOTKEY, version="test")
        kept, refused = make_vector(1), make_vector(2)
        for vector in (kept, refused):
            result = Result(Outcome.SUBMISSION_OUTCOME_SKIPPED_STALE, "expired")
            await store.record(
                vector, result, factory.make(vector.epoch, vector.epoch_id, result, time.time_ns())
            )
        fake.script.report_codes = [
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.OK,
            grpc.StatusCode.NOT_FOUND,
        ]
        reporter = Reporter(store, send, Backoff(0.01, 0.05))
        task = asyncio.create_task(reporter.run())

        async def settled() -> bool:
            return not await store.unsent_reports()

        await eventually(settled, what="the outbox to drain")
        task.cancel()
        states = {r.report.epoch: (r.state, r.attempts) for r in await store.reports()}
        assert states == {1: (REPORT_SENT, 3), 2: (REPORT_DROPPED, 1)}
        sent = fake.script.reports
        assert len(sent) == 4
        assert sent[0] == sent[1] == sent[2], "every retry sends the same bytes"
        assert weights_pb2.SubmissionReport.FromString(sent[3]).epoch == 2
    finally:
        await channel.close()
        await store.close()


def bookmark(offset_seconds: float) -> weights_pb2.WatchWeightsResponse:
    """A WatchWeights bookmark whose server time is ``offset_seconds`` from this host's."""
    message = weights_pb2.WatchWeightsResponse(
        cursor=common_pb2.WatchCursor(server_epoch="s", history_id="history-a", revision=0),
        bookmark=weights_pb2.WeightsBookmark(),
    )
    message.bookmark.server_time.FromNanoseconds(time.time_ns() + int(offset_seconds * NS))
    return message


def records(caplog: pytest.LogCaptureFixture, logger: str, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == logger and r.getMessage().startswith(text)]


async def test_clock_skew_is_warned_once_per_episode(
    fake: FakeMaster, local_chain: LocalChain, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="validator")
    # Skewed twice in a row (one warning), in line, then skewed the other way (a second).
    fake.script.weights_streams = [
        [bookmark(120), bookmark(121), bookmark(1), bookmark(-90), bookmark(-91)],
    ]
    config = agent_config(
        master=fake.address,
        chain=local_chain.url,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'validator.db'}",
        clock_skew=30.0,
    )
    agent = Agent(config)
    await agent.start()
    try:

        async def reconnected() -> bool:
            # The scripted stream ends after its messages, so a second call means the
            # agent applied all five.
            return len(fake.script.weights_requests) >= 2

        await eventually(reconnected, what="the bookmarks applied and the stream reopened")
    finally:
        await agent.stop()
    warnings = records(caplog, "validator.intake", "this host's clock and the master's disagree")
    offsets = [float(getattr(r, "offset_seconds", "nan")) for r in warnings]
    assert len(offsets) == 2, offsets
    assert 119 < offsets[0] < 121
    assert -91 < offsets[1] < -89
    assert all(getattr(r, "tolerated", None) == 30.0 for r in warnings)


async def test_a_refused_stream_is_logged_as_an_error_and_retried(
    fake: FakeMaster, local_chain: LocalChain, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="validator")
    # Three WatchWeights calls refused as the master refuses an unknown validator; the
    # fourth stays open.
    fake.script.weights_streams = [[], [], []]
    fake.script.end_code = grpc.StatusCode.PERMISSION_DENIED
    config = agent_config(
        master=fake.address,
        chain=local_chain.url,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'validator.db'}",
    )
    agent = Agent(config)
    await agent.start()
    try:

        async def retried() -> bool:
            return len(fake.script.weights_requests) >= 4

        await eventually(retried, what="three refusals and a fourth call")
        healthy, details = agent.health()
        assert healthy, details  # a refusal is the operator's to fix; the agent keeps trying
        assert details["streams"]["weights"] is False
    finally:
        await agent.stop()
    refused = records(caplog, "validator.streams", "the master refuses this validator's stream")
    assert [(r.levelno, getattr(r, "stream", None), getattr(r, "code", None)) for r in refused] == [
        (logging.ERROR, "weights", "PERMISSION_DENIED")
    ] * 3
    assert all(getattr(r, "error", None) == "scripted end of stream" for r in refused)
    assert all(0 <= getattr(r, "retry_in", -1) <= config.reconnect_max for r in refused)
    # The registry stream, open all along, was never refused.
    assert not records(caplog, "validator.streams", "stream to the master ended")


class HungSubmission(ChainInFront):
    """The real chain, except that set_weights never answers (a node that hangs)."""

    def __init__(self, chain: Chain) -> None:
        super().__init__(chain)
        self.entered = asyncio.Event()

    async def set_weights(
        self, keypair: Any, weights: ChainWeights, *, mechanism_id: int = 0
    ) -> SubmitResult:
        self.entered.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_a_submission_still_in_flight_after_the_grace_is_never_submitted_again(
    fake: FakeMaster, local_chain: LocalChain, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="validator")
    vector = make_vector(3, weights=((0, 0.5), (2, 0.5)))
    fake.script.weights_streams = [[snapshot_message(vector, Reason.SNAPSHOT_REASON_INITIAL)]]
    fake.script.hold = asyncio.Event()  # the stream stays open
    config = agent_config(
        master=fake.address,
        chain=local_chain.url,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'validator.db'}",
        shutdown_grace=0.3,
    )
    hung = HungSubmission(local_chain.chain)
    agent = Agent(config, chain=hung)
    await agent.start()
    try:
        await asyncio.wait_for(hung.entered.wait(), 30)
    finally:
        await agent.stop()
    stopped = records(caplog, "validator.agent", "a submission was still in flight")
    assert [getattr(r, "epoch", None) for r in stopped] == [3]

    # The restarted agent, on the real chain, closes the epoch without submitting it.
    fake.script.hold.set()
    again = Agent(config)
    await again.start()
    try:
        assert again.store is not None
        store = again.store

        async def closed() -> EpochRecord | None:
            record = await store.epoch(vector.epoch_id)
            return record if record is not None and record.state == DONE else None

        record = await eventually(closed, what="epoch 3 closed")
        assert record.outcome == Outcome.SUBMISSION_OUTCOME_FAILED
        assert record.message == UNKNOWN_AFTER_STOP
    finally:
        await again.stop()
    assert await local_chain.subnet.weights_set(HOTKEY) is None
