"""What a ``platform shim`` process forwards, and where: the request context and
metadata reaching the challenge, the broker door reaching the master, a challenge
that is not running, and the graceful stop.

The challenge here is an SDK challenge in the test process that records what it
receives. The master's Broker is not built yet (the master answers UNIMPLEMENTED
after auth), so a small grpc.aio Broker server in the test process stands in for
the master and records the metadata the door sends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from bittensor.sp_core import Keypair
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from challenge_shim import sdk
from challenge_shim.sdk import (
    Challenge,
    HealthReport,
    HealthState,
    RunningChallenge,
    WeightsRequest,
)
from platform_common import not_serving
from platform_network.v1 import broker_pb2, broker_pb2_grpc, challenge_pb2
from tests.shim.support import (
    AUTH,
    SLUG,
    TOKEN,
    Process,
    details,
    shim,
    stub,
    weights_request,
)

pytestmark = pytest.mark.process

ALICE = Keypair.create_from_uri("//Alice").ss58_address
MAX_DEADLINE = 3.0
HEALTH_TIMEOUT = 0.5
Context = grpc.aio.ServicerContext[Any, Any]


@dataclass
class Recorder:
    requests: list[WeightsRequest] = field(default_factory=list)
    broker_metadata: list[dict[str, str]] = field(default_factory=list)
    health: HealthReport = field(default_factory=lambda: HealthReport(HealthState.SERVING))
    health_delay: float = 0.0


class StandInBroker(broker_pb2_grpc.BrokerServicer):
    """The master's Broker as far as the door can tell: records metadata, answers."""

    def __init__(self, recorder: Recorder) -> None:
        self._recorder = recorder

    def _record(self, context: Context) -> None:
        self._recorder.broker_metadata.append(
            {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        )

    async def GetJob(self, request: broker_pb2.GetJobRequest, context: Context) -> broker_pb2.Job:
        self._record(context)
        if not request.job_id:
            status = status_pb2.Status(
                code=code_pb2.INVALID_ARGUMENT, message="job_id: must not be empty"
            )
            detail = any_pb2.Any()
            detail.Pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field="job_id", description="must not be empty"
                        )
                    ]
                )
            )
            status.details.append(detail)
            await context.abort_with_status(rpc_status.to_status(status))
        return broker_pb2.Job(
            job_id=request.job_id, challenge_slug=SLUG, state=broker_pb2.JOB_STATE_RUNNING
        )

    async def _not_here(self, context: Context) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not served by the stand-in")

    async def SubmitJob(self, request: Any, context: Context) -> Any:
        return await self._not_here(context)

    async def ListJobs(self, request: Any, context: Context) -> Any:
        return await self._not_here(context)

    async def CancelJob(self, request: Any, context: Context) -> Any:
        return await self._not_here(context)

    async def StreamJobLogs(
        self, request: Any, context: Context
    ) -> AsyncIterator[broker_pb2.LogChunk]:
        await self._not_here(context)
        yield broker_pb2.LogChunk()  # unreachable: abort raises

    async def WatchJob(
        self, request: broker_pb2.WatchJobRequest, context: Context
    ) -> AsyncIterator[broker_pb2.Job]:
        self._record(context)
        for state in (broker_pb2.JOB_STATE_RUNNING, broker_pb2.JOB_STATE_SUCCEEDED):
            yield broker_pb2.Job(job_id=request.job_id, state=state)


@dataclass
class Setup:
    recorder: Recorder
    challenge: RunningChallenge
    shim: Process
    channel: grpc.aio.Channel

    @property
    def client(self) -> Any:
        return stub(self.channel)


@pytest.fixture(scope="module")
async def setup(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Setup]:
    recorder = Recorder()
    challenge = Challenge(name="recorder", version="0.0.1")

    @challenge.weights
    async def weights(request: WeightsRequest) -> dict[str, float]:
        recorder.requests.append(request)
        return {ALICE: 1.0}

    @challenge.health
    async def health() -> HealthReport:
        await asyncio.sleep(recorder.health_delay)
        return recorder.health

    running = await challenge.start("127.0.0.1:0", token=TOKEN, grace=0.5)
    master = grpc.aio.server()
    broker_pb2_grpc.add_BrokerServicer_to_server(StandInBroker(recorder), master)
    master_port = master.add_insecure_port("127.0.0.1:0")
    await master.start()
    workdir: Path = tmp_path_factory.mktemp("shim-forwarding")
    front = shim(
        workdir,
        running.address,
        "--max-deadline",
        str(MAX_DEADLINE),
        "--health-timeout",
        str(HEALTH_TIMEOUT),
        "--master-address",
        f"127.0.0.1:{master_port}",
        "--broker-listen",
        "127.0.0.1:0",
    )
    try:
        await asyncio.to_thread(front.start)
        channel = grpc.aio.insecure_channel(front.ready["listen"])
        try:
            yield Setup(recorder, running, front, channel)
        finally:
            await channel.close()
    finally:
        front.stop()
        await running.stop()
        await master.stop(0)


async def test_request_context_reaches_the_challenge(setup: Setup) -> None:
    request = challenge_pb2.GetWeightsRequest(
        epoch=12, epoch_id="e-12", netuid=7, metagraph_block=4242
    )
    answer = await setup.client.GetWeights(request, metadata=AUTH)
    assert [(e.hotkey, e.score) for e in answer.entries] == [(ALICE, 1.0)]
    seen = setup.recorder.requests[-1]
    assert (seen.epoch, seen.epoch_id, seen.netuid, seen.metagraph_block) == (12, "e-12", 7, 4242)
    # No deadline from the master: the challenge gets the shim's max_deadline.
    assert seen.time_budget == MAX_DEADLINE


async def test_a_challenge_not_serving_is_not_asked_for_weights(setup: Setup) -> None:
    asked = len(setup.recorder.requests)
    setup.recorder.health = HealthReport(HealthState.STARTING, "warming up")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await setup.client.GetWeights(weights_request(), metadata=AUTH, timeout=10)
    finally:
        setup.recorder.health = HealthReport(HealthState.SERVING)
    error = info.value
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details(error) == "health STARTING: warming up"
    assert len(setup.recorder.requests) == asked, "the weights hook must not have been called"
    # The master tells it apart from a refused answer by its ErrorInfo.
    status = rpc_status.from_call(error)
    assert status is not None
    info_detail = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info_detail)
    assert (info_detail.domain, info_detail.reason) == (not_serving.DOMAIN, not_serving.REASON)
    assert info_detail.metadata["health_status"] == "STARTING"
    assert not_serving.reason_of(error) == "health STARTING: warming up"

    # Serving again: asked, and answering.
    answer = await setup.client.GetWeights(weights_request(), metadata=AUTH, timeout=10)
    assert [(e.hotkey, e.score) for e in answer.entries] == [(ALICE, 1.0)]
    assert len(setup.recorder.requests) == asked + 1


async def test_a_health_check_slower_than_the_health_timeout_is_not_serving(
    setup: Setup,
) -> None:
    asked = len(setup.recorder.requests)
    setup.recorder.health_delay = HEALTH_TIMEOUT * 4
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await setup.client.GetWeights(weights_request(), metadata=AUTH, timeout=10)
        health = await setup.client.Health(challenge_pb2.HealthRequest(), metadata=AUTH, timeout=10)
    finally:
        setup.recorder.health_delay = 0.0
    # Recorded by the master as unhealthy, not as a weights call that timed out.
    reason = not_serving.reason_of(info.value)
    assert reason is not None
    assert reason.startswith("health NOT_SERVING: "), reason
    assert len(setup.recorder.requests) == asked, "the weights hook must not have been called"
    # The Health call says the same.
    assert health.status == challenge_pb2.HEALTH_STATUS_NOT_SERVING
    assert reason == f"health NOT_SERVING: {health.message}"


async def test_time_budget_is_the_smaller_deadline(setup: Setup) -> None:
    await setup.client.GetWeights(weights_request(), metadata=AUTH, timeout=1.0)
    budget = setup.recorder.requests[-1].time_budget
    assert budget is not None
    # gRPC carries the deadline with a coarse, rounded-up timeout header, hence the slack;
    # the point is that the master's 1 s wins over the shim's 3 s.
    assert 0 < budget <= 1.1


async def test_the_challenge_checks_the_forwarded_token(setup: Setup) -> None:
    # The SDK was given the token: it only answers because the shim forwarded it.
    direct = grpc.aio.insecure_channel(setup.challenge.address)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub(direct).GetWeights(weights_request(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answer = await stub(direct).GetWeights(weights_request(), metadata=AUTH, timeout=5)
        assert len(answer.entries) == 1
    finally:
        await direct.close()


async def test_broker_door_forwards_with_the_challenge_token(setup: Setup) -> None:
    channel = sdk.broker_channel(setup.shim.ready["broker"])
    try:
        broker = sdk.broker_stub(channel)
        # Whatever credentials the challenge sends are replaced by its own token.
        job = await broker.GetJob(
            broker_pb2.GetJobRequest(job_id="job-abc"),
            metadata=(("authorization", "Bearer forged"), ("x-platform-challenge", "other")),
            timeout=10,
        )
        assert job.job_id == "job-abc"
        assert job.state == broker_pb2.JOB_STATE_RUNNING
        sent = setup.recorder.broker_metadata[-1]
        assert sent["authorization"] == f"Bearer {TOKEN}"
        assert sent["x-platform-challenge"] == SLUG

        states = [
            job.state async for job in broker.WatchJob(broker_pb2.WatchJobRequest(job_id="j"))
        ]
        assert states == [broker_pb2.JOB_STATE_RUNNING, broker_pb2.JOB_STATE_SUCCEEDED]
        assert setup.recorder.broker_metadata[-1]["authorization"] == f"Bearer {TOKEN}"

        # The master's refusal comes back unchanged, details included.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await broker.GetJob(broker_pb2.GetJobRequest(job_id=""), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == "job_id: must not be empty"
        status = rpc_status.from_call(info.value)
        assert status is not None
        bad_request = error_details_pb2.BadRequest()
        assert status.details[0].Unpack(bad_request)
        assert bad_request.field_violations[0].field == "job_id"

        # A method the stand-in does not implement: the master's answer, passed through.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await broker.CancelJob(broker_pb2.CancelJobRequest(job_id="j"), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert info.value.details() == "not served by the stand-in"
    finally:
        await channel.close()


def test_broker_channel_needs_an_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(sdk.BROKER_ADDR_ENV, raising=False)
    with pytest.raises(RuntimeError, match="PLATFORM_BROKER_ADDR"):
        sdk.broker_channel()


async def test_challenge_not_running_then_graceful_stop(setup: Setup) -> None:
    await setup.challenge.stop()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await setup.client.GetWeights(weights_request(), metadata=AUTH, timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert details(info.value).startswith(f"challenge unreachable at {setup.challenge.address}: ")
    health = await setup.client.Health(challenge_pb2.HealthRequest(), metadata=AUTH, timeout=10)
    assert health.status == challenge_pb2.HEALTH_STATUS_NOT_SERVING
    assert health.message.startswith(f"challenge unreachable at {setup.challenge.address}: ")

    # SIGTERM: drain, exit 0.
    assert await asyncio.to_thread(setup.shim.terminate) == 0
    assert '"msg":"shim stopped"' in setup.shim.log()
