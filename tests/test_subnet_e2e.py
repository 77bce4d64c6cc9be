"""The whole subnet, headless: what ``make dev`` runs, checked end to end.

``platform dev`` starts the simulated chain, the master (SQLite, local runtime, Envoy
edge), the two example challenges behind their shims, and two validator agents. A
miner (uid 5, registered on the chain) solves a task of each challenge through the
edge with signed requests; the next sealed epoch pays uid 5; both validators submit
that epoch; and the weights stored on the chain for each validator equal the u16
vector the master sealed.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest

from platform_common.chain import LocalSubnet
from platform_common.keys import load_signer
from platform_common.miner import signed_headers
from platform_network.v1 import weights_pb2, weights_pb2_grpc
from tests.support.devnet import launch, left_behind, read_until
from tests.support.ports import free_port

pytestmark = pytest.mark.process

MINER_UID = 5
MINER = load_signer(f"//platform-dev/hotkey/{MINER_UID}")
VALIDATORS = [load_signer(f"//platform-dev/hotkey/{uid}").ss58_address for uid in (0, 1)]
WITHIN = 120.0  # a tempo is 20 one-second blocks; a few of them at most


def _http(url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> Any:
    request = urllib.request.Request(url, data=body, headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


def _solve(edge: str, slug: str, task_id: int) -> Any:
    task = _http(f"{edge}/challenges/{slug}/task?id={task_id}")
    target = f"/challenges/{slug}/submit"
    body = json.dumps({"task_id": task_id, "answer": sum(task["numbers"])}).encode()
    headers = signed_headers(MINER, "POST", target, body)
    headers["Content-Type"] = "application/json"
    return _http(edge + target, body, headers)


async def _paid_epoch(address: str, metadata: Any) -> weights_pb2.Epoch:
    """The first sealed epoch that pays the miner, with both challenges OK."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = weights_pb2_grpc.WeightsStub(channel)
        deadline = time.monotonic() + WITHIN
        while time.monotonic() < deadline:
            listed = await stub.ListEpochs(
                weights_pb2.ListEpochsRequest(page_size=5), metadata=metadata
            )
            for summary in listed.epochs:
                epoch = await stub.GetEpoch(
                    weights_pb2.GetEpochRequest(epoch=summary.epoch), metadata=metadata
                )
                statuses = {r.slug: r.status for r in epoch.challenges}
                paid = {w.uid for w in epoch.vector.weights}
                if MINER_UID in paid and set(statuses.values()) == {
                    weights_pb2.CHALLENGE_EPOCH_STATUS_OK
                }:
                    return epoch
            await asyncio.sleep(1)
    raise AssertionError("no epoch paid the miner")


async def _submitted_by_all(address: str, metadata: Any, epoch: int) -> dict[str, int]:
    """The block at which each validator set ``epoch``'s weights, once all of them did."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = weights_pb2_grpc.WeightsStub(channel)
        deadline = time.monotonic() + WITHIN
        while time.monotonic() < deadline:
            answer = await stub.ListSubmissions(
                weights_pb2.ListSubmissionsRequest(epoch=epoch, page_size=50), metadata=metadata
            )
            done = {
                s.report.validator_hotkey: s.report.block
                for s in answer.submissions
                if s.report.outcome == weights_pb2.SUBMISSION_OUTCOME_SUBMITTED
            }
            if set(done) >= set(VALIDATORS):
                return done
            await asyncio.sleep(1)
    raise AssertionError(f"epoch {epoch} was not submitted by every validator")


def test_a_miner_through_the_edge_ends_up_in_the_weights_every_validator_sets(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    edge_port = free_port()
    proc = launch(tmp_path, state, edge_port, validators=2)
    seen: list[str] = []
    try:
        read_until(proc, r"appear below as they happen", seen, WITHIN)
        address = re.search(r"master\s+(127\.0\.0\.1:\d+)", "".join(seen))
        assert address is not None
        metadata = (("authorization", f"Bearer {(state / 'admin-token').read_text().strip()}"),)
        edge = f"http://127.0.0.1:{edge_port}"

        # Both challenges are running behind the edge once the runtime placed them.
        deadline = time.monotonic() + WITHIN
        while True:
            try:
                answers = [_solve(edge, slug, 1) for slug in ("native", "http")]
                break
            except OSError:
                assert time.monotonic() < deadline, "the examples never answered at the edge"
                time.sleep(0.5)
        assert [a["correct"] for a in answers] == [True, True]

        epoch = asyncio.run(_paid_epoch(address.group(1), metadata))
        paid = {w.uid: w.hotkey for w in epoch.vector.weights}
        assert paid[MINER_UID] == MINER.ss58_address
        submitted = asyncio.run(_submitted_by_all(address.group(1), metadata, epoch.vector.epoch))
        assert set(submitted) >= set(VALIDATORS)

        # What each validator put on chain is the master's u16 vector for that epoch (read
        # at the block it reported: a later epoch may have replaced it since).
        chain = LocalSubnet.open(state / "chain.json")
        expected = epoch.vector.chain_weights
        for uid, hotkey in enumerate(VALIDATORS):
            row = asyncio.run(chain.weights_set(uid, block=submitted[hotkey]))
            assert row is not None, f"validator {uid} set no weights"
            assert (row.uids, row.values) == (tuple(expected.uids), tuple(expected.values))
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert left_behind(state) == []
