"""What the master serves: health per served service, published-but-unserved contracts."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from platform_network.v1 import broker_pb2, broker_pb2_grpc, registry_pb2
from tests.helpers import refused, spec
from tests.support.master import ADMIN, RunningMaster

SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_health_reports_served_services_only(master: RunningMaster) -> None:
    health = health_pb2_grpc.HealthStub(master.channel)
    for service in ("", "platform_network.v1.Registry", "platform_network.v1.Weights"):
        answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == SERVING
    for service in ("platform_network.v1.Broker", "nope"):
        await refused(
            health.Check(health_pb2.HealthCheckRequest(service=service)),
            grpc.StatusCode.NOT_FOUND,
        )


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_unserved_contracts_authenticate_then_answer_unimplemented(
    master: RunningMaster,
) -> None:
    # Broker calls are for challenges: the admin token is not a challenge credential.
    broker = broker_pb2_grpc.BrokerStub(master.channel)
    error = await refused(
        broker.GetJob(broker_pb2.GetJobRequest(), metadata=ADMIN),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert "x-platform-challenge: <slug>" in (error.details() or "")


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_a_challenge_token_opens_the_broker_door_which_is_not_built_yet(
    master: RunningMaster,
) -> None:
    created = await master.registry.CreateChallenge(
        registry_pb2.CreateChallengeRequest(challenge=spec("broker-user")), metadata=ADMIN
    )
    broker = broker_pb2_grpc.BrokerStub(master.channel)
    as_challenge = (
        ("authorization", f"Bearer {created.token}"),
        ("x-platform-challenge", "broker-user"),
    )
    error = await refused(
        broker.GetJob(broker_pb2.GetJobRequest(), metadata=as_challenge),
        grpc.StatusCode.UNIMPLEMENTED,
    )
    assert "Broker.GetJob is part of the contract" in (error.details() or "")
    wrong_slug = (as_challenge[0], ("x-platform-challenge", "someone-else"))
    error = await refused(
        broker.GetJob(broker_pb2.GetJobRequest(), metadata=wrong_slug),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert "invalid challenge token for 'someone-else'" in (error.details() or "")
