"""The agent against a real master (in this process, or a ``platform master`` process)
over the local simulated subnet with the real Bittensor SDK: the weights that land on
chain, the rate limit, a master down past a vector's lifetime, a master killed with
SIGKILL and restarted on the same database.

These need the master to accept calls signed with a validator hotkey
(``AUTH_POLICY_VALIDATOR``); a master without it answers UNAUTHENTICATED and these
tests fail waiting for the first submission.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from platform_common.chain import LocalSubnet, SubnetHyperparameters
from platform_network.v1 import registry_pb2, weights_pb2, weights_pb2_grpc
from tests.conftest import fresh_database
from tests.epochs.conftest import EpochMaster, Subnet, start_epoch_master
from tests.helpers import create
from tests.support.master import ADMIN, MasterProcess
from tests.support.ports import free_port
from tests.support.waiting import eventually
from tests.validator.conftest import fresh_store_url
from tests.validator.support import MASTER_KEY, VALIDATOR_KEY, agent_config, signer
from validator.agent import Agent
from validator.store import DONE, EpochRecord

Outcome = weights_pb2.SubmissionOutcome
HOTKEY = signer(VALIDATOR_KEY).ss58_address
SUBMITTED = Outcome.SUBMISSION_OUTCOME_SUBMITTED


@dataclass
class Site:
    subnet: Subnet
    master_url: str
    store_url: str
    token_key_file: Path


def make_subnet(tmp_path: Path, rate_limit: int) -> Subnet:
    path = tmp_path / "chain.json"
    local = LocalSubnet.create(
        path,
        netuid=1,
        neurons=16,
        validators=4,
        manual_blocks=True,
        hyperparameters=SubnetHyperparameters(weights_rate_limit=rate_limit),
    )
    return Subnet(f"local+file:{path}", local)


async def make_site(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, rate_limit: int = 10
) -> Site:
    subnet = make_subnet(tmp_path, rate_limit)
    await subnet.local.advance(5)  # past genesis: included blocks are > 0
    key = tmp_path / "token.key"
    key.write_text(secrets.token_hex(32) + "\n")
    return Site(
        subnet,
        await fresh_database(backend, request, tmp_path),
        await fresh_store_url(backend, request, tmp_path),
        key,
    )


@pytest.fixture
async def site(request: pytest.FixtureRequest, tmp_path: Path) -> Site:
    return await make_site("sqlite", request, tmp_path)


async def start_master(site: Site, **overrides: Any) -> EpochMaster:
    return await start_epoch_master(site.master_url, site.subnet, site.token_key_file, **overrides)


async def start_agent(site: Site, master: str, **overrides: Any) -> Agent:
    agent = Agent(
        agent_config(master=master, chain=site.subnet.url, database_url=site.store_url, **overrides)
    )
    await agent.start()
    return agent


@pytest.fixture
async def running(site: Site) -> AsyncIterator[tuple[EpochMaster, Agent]]:
    master = await start_master(site)
    agent = await start_agent(site, master.address)
    try:
        yield master, agent
    finally:
        await agent.stop()
        await master.close()


async def outcome_of(agent: Agent, epoch: int, *, within: float = 30.0) -> EpochRecord:
    assert agent.store is not None
    store = agent.store

    async def done() -> EpochRecord | None:
        for record in await store.epochs():
            if record.epoch == epoch and record.state == DONE:
                return record
        return None

    record: EpochRecord = await eventually(
        done, within=within, what=f"the agent's outcome for epoch {epoch}"
    )
    return record


async def row_on_chain(site: Site) -> tuple[int, tuple[int, ...], tuple[int, ...]] | None:
    row = await site.subnet.local.weights_set(HOTKEY)
    return None if row is None else (row.block, row.uids, row.values)


async def reports_at_master(address: str) -> list[weights_pb2.SubmissionReport]:
    async with grpc.aio.insecure_channel(address) as channel:
        listed = await weights_pb2_grpc.WeightsStub(channel).ListSubmissions(
            weights_pb2.ListSubmissionsRequest(validator_hotkey=HOTKEY, page_size=1000),
            metadata=ADMIN,
        )
    return sorted((s.report for s in listed.submissions), key=lambda r: r.epoch)


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
async def test_the_weights_on_chain_are_the_masters_u16_vector(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    site = await make_site(backend, request, tmp_path)
    master = await start_master(site)
    agent = await start_agent(site, master.address)
    try:
        await create(master.registry, "alpha", 0.25)
        sealed = (await master.seal()).vector
        record = await outcome_of(agent, sealed.epoch)
        assert record.outcome == SUBMITTED
        assert record.epoch_id == sealed.epoch_id
        assert await row_on_chain(site) == (
            5,
            tuple(sealed.chain_weights.uids),
            tuple(sealed.chain_weights.values),
        )
        assert (record.block, record.extrinsic_hash) != (0, "")

        async def reported() -> list[weights_pb2.SubmissionReport]:
            return await reports_at_master(master.address)

        [report] = await eventually(reported, what="the report stored by the master")
        assert (report.epoch, report.epoch_id, report.outcome) == (
            sealed.epoch,
            sealed.epoch_id,
            SUBMITTED,
        )
        assert (report.block, report.extrinsic_hash) == (record.block, record.extrinsic_hash)

        # The registry stream follows the master's registry too.
        assert agent.store is not None
        store = agent.store

        async def registry_seen() -> list[registry_pb2.Challenge]:
            return await store.challenges()

        [alpha] = await eventually(registry_seen, what="the registry in the agent's store")
        assert alpha.slug == "alpha"
    finally:
        await agent.stop()
        await master.close()


async def test_a_rate_limited_epoch_waits_for_the_allowed_block(
    site: Site, running: tuple[EpochMaster, Agent]
) -> None:
    master, agent = running
    first = (await master.seal()).vector
    assert (await outcome_of(agent, first.epoch)).block == 5
    second = (await master.seal()).vector
    submitter = agent.submitter
    assert submitter is not None

    async def waiting() -> int:
        return submitter.waiting_for_block

    assert await eventually(waiting, what="a wait for the rate limit") == 15
    await site.subnet.local.advance(10)
    record = await outcome_of(agent, second.epoch)
    assert (record.outcome, record.block) == (SUBMITTED, 15)
    assert await row_on_chain(site) == (
        15,
        tuple(second.chain_weights.uids),
        tuple(second.chain_weights.values),
    )
    assert await site.subnet.local.next_nonce(HOTKEY) == 2


async def test_a_master_down_past_the_vector_lifetime_stops_submissions_until_it_returns(
    site: Site,
) -> None:
    lifetime = 3.0
    listen = f"127.0.0.1:{free_port()}"
    master = await start_master(site, listen=listen, vector_lifetime=lifetime)
    agent = await start_agent(site, listen)
    try:
        first = (await master.seal()).vector
        assert (await outcome_of(agent, first.epoch)).outcome == SUBMITTED
        second = (await master.seal()).vector
        submitter = agent.submitter
        assert submitter is not None

        async def waiting() -> int:
            return submitter.waiting_for_block

        await eventually(waiting, what="epoch 2 waiting for the rate limit")
        await master.close()

        async def expired() -> bool:
            return agent.vector_expired

        await eventually(expired, within=lifetime + 10, what="the vector to expire")
        record = await outcome_of(agent, second.epoch)
        assert record.outcome == Outcome.SUBMISSION_OUTCOME_RATE_LIMITED
        _, health = agent.health()
        assert health["vector_expired"] is True
        assert health["streams"] == {"weights": False, "registry": False}
        # The rate limit would allow a submission now; nothing fresh is held.
        await site.subnet.local.advance(20)
        assert await row_on_chain(site) == (5, tuple(first.chain_weights.uids), (65535,))
        assert await site.subnet.local.next_nonce(HOTKEY) == 1

        master = await start_master(site, listen=listen, vector_lifetime=lifetime)
        third = (await master.seal()).vector
        record = await outcome_of(agent, third.epoch)
        assert (record.outcome, record.block) == (SUBMITTED, 25)
        assert (await row_on_chain(site) or (0,))[0] == 25
        assert agent.vector_expired is False

        async def all_reported() -> bool:
            return len(await reports_at_master(listen)) == 3

        await eventually(all_reported, what="the three reports at the master")
        outcomes = [r.outcome for r in await reports_at_master(listen)]
        assert outcomes == [SUBMITTED, Outcome.SUBMISSION_OUTCOME_RATE_LIMITED, SUBMITTED]
    finally:
        await agent.stop()
        await master.close()


@pytest.mark.process
async def test_a_master_killed_and_restarted_loses_no_epoch_and_repeats_none(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    site = await make_site("sqlite", request, tmp_path, rate_limit=0)
    listen = f"127.0.0.1:{free_port()}"

    def master_process(name: str) -> MasterProcess:
        # One epoch sealed at start-up, the next one an hour later.
        return MasterProcess(
            tmp_path / name,
            site.master_url,
            "--chain",
            site.subnet.url,
            "--epoch-schedule",
            "interval",
            "--epoch-interval",
            "3600",
            "--token-key-file",
            str(site.token_key_file),
            env={"PLATFORM_HOTKEY": MASTER_KEY},
        )

    first = master_process("m1")
    first.start(listen)
    agent = await start_agent(site, listen)
    second: MasterProcess | None = None
    try:
        assert (await outcome_of(agent, 1)).outcome == SUBMITTED
        await site.subnet.local.advance(1)
        first.kill()  # streams open, no shutdown code runs
        second = master_process("m2")
        second.start(listen)
        record = await outcome_of(agent, 2)
        assert (record.outcome, record.block) == (SUBMITTED, 6)

        # Resumed from its positions: the only snapshots are the first start's.
        assert agent.weights is not None
        assert agent.weights.snapshots == {"SNAPSHOT_REASON_INITIAL": 1}
        assert agent.weights.cursor is not None
        assert agent.weights.cursor.revision == 2
        assert agent.store is not None
        epochs = await agent.store.epochs()
        assert [(r.epoch, r.outcome) for r in epochs] == [(1, SUBMITTED), (2, SUBMITTED)]
        # Two epochs, two extrinsics: none repeated.
        assert await site.subnet.local.next_nonce(HOTKEY) == 2

        async def reported() -> list[weights_pb2.SubmissionReport]:
            found = await reports_at_master(listen)
            return found if len(found) == 2 else []

        reports = await eventually(reported, what="one report per epoch at the master")
        assert [(r.epoch, r.outcome) for r in reports] == [(1, SUBMITTED), (2, SUBMITTED)]
    finally:
        await agent.stop()
        first.kill()
        if second is not None:
            second.stop()
