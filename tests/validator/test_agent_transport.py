"""The agent's side of the wire against a scripted master on real gRPC: signed calls,
streams resumed from the stored position after a break and after a restart, refusals
reported, reports retried with the same bytes until acknowledged."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from platform_common import callauth
from platform_network.v1 import common_pb2, weights_pb2, weights_pb2_grpc
from tests.support.waiting import eventually
from tests.validator.conftest import LocalChain
from tests.validator.fake_master import FakeMaster, Script, snapshot_message, vector_message
from tests.validator.support import NS, VALIDATOR_KEY, agent_config, make_vector, signer
from validator.agent import Agent
from validator.reports import Reporter, ReportFactory
from validator.store import DONE, REPORT_DROPPED, REPORT_SENT, Result, Store
from validator.streams import Backoff

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
