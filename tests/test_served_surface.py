"""What the master serves: health per served service, published-but-unserved contracts."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from platform_network.v1 import broker_pb2, broker_pb2_grpc, weights_pb2, weights_pb2_grpc
from tests.helpers import refused
from tests.support.master import ADMIN, RunningMaster

SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_health_reports_served_services_only(master: RunningMaster) -> None:
    health = health_pb2_grpc.HealthStub(master.channel)
    for service in ("", "platform_network.v1.Registry"):
        answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == SERVING
    for service in ("platform_network.v1.Weights", "platform_network.v1.Broker", "nope"):
        await refused(
            health.Check(health_pb2.HealthCheckRequest(service=service)),
            grpc.StatusCode.NOT_FOUND,
        )


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_unserved_contracts_authenticate_then_answer_unimplemented(
    master: RunningMaster,
) -> None:
    weights = weights_pb2_grpc.WeightsStub(master.channel)
    await refused(
        weights.GetLatestWeights(weights_pb2.GetLatestWeightsRequest()),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    error = await refused(
        weights.GetLatestWeights(weights_pb2.GetLatestWeightsRequest(), metadata=ADMIN),
        grpc.StatusCode.UNIMPLEMENTED,
    )
    assert "Weights.GetLatestWeights is part of the contract" in (error.details() or "")
    # Broker calls are for challenges: the admin token is not a challenge credential.
    broker = broker_pb2_grpc.BrokerStub(master.channel)
    error = await refused(
        broker.GetJob(broker_pb2.GetJobRequest(), metadata=ADMIN),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert "AUTH_POLICY_CHALLENGE" in (error.details() or "")
