"""The challenge SDK, served over real gRPC on 127.0.0.1 and called as the shim calls it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

import grpc
import pytest
from bittensor.sp_core import Keypair

from challenge_shim.sdk import Challenge, HealthReport, HealthState, Weights, WeightsRequest
from platform_network.v1 import challenge_pb2
from tests.shim.support import AUTH, TOKEN, stub, weights_request

ALICE = Keypair.create_from_uri("//Alice").ss58_address
BOB = Keypair.create_from_uri("//Bob").ss58_address


@asynccontextmanager
async def served(challenge: Challenge, token: str | None = None) -> AsyncIterator[Any]:
    running = await challenge.start("127.0.0.1:0", token=token, grace=0.1)
    channel = grpc.aio.insecure_channel(running.address)
    try:
        yield stub(channel)
    finally:
        await channel.close()
        await running.stop()


async def weights_of(challenge: Challenge) -> challenge_pb2.GetWeightsResponse:
    async with served(challenge) as client:
        answer: challenge_pb2.GetWeightsResponse = await client.GetWeights(
            weights_request(), timeout=10
        )
        return answer


async def error_of(call: Callable[[Any], Awaitable[Any]], challenge: Challenge) -> Any:
    async with served(challenge) as client:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(client)
        return info.value


async def test_plain_function_returning_a_mapping() -> None:
    challenge = Challenge("c", "1", get_weights=lambda: {ALICE: 2, BOB: 0.5})
    answer = await weights_of(challenge)
    assert [(e.hotkey, e.score) for e in answer.entries] == [(ALICE, 2.0), (BOB, 0.5)]
    assert answer.scoring_version == ""


async def test_async_hook_receives_the_request_and_labels_its_scores() -> None:
    seen: list[WeightsRequest] = []
    challenge = Challenge("c", "1")

    @challenge.weights
    async def weights(request: WeightsRequest) -> Weights:
        seen.append(request)
        return Weights({ALICE: 1.0}, scoring_version="v3")

    async with served(challenge) as client:
        request = challenge_pb2.GetWeightsRequest(
            epoch=5, epoch_id="e5", netuid=3, metagraph_block=99
        )
        request.time_budget.FromMilliseconds(2500)
        answer = await client.GetWeights(request, timeout=10)
    assert answer.scoring_version == "v3"
    assert seen == [
        WeightsRequest(epoch=5, epoch_id="e5", netuid=3, metagraph_block=99, time_budget=2.5)
    ]


async def test_a_ready_response_passes_through() -> None:
    ready = challenge_pb2.GetWeightsResponse(
        entries=[challenge_pb2.WeightEntry(hotkey=ALICE, score=1.0)] * 2
    )
    answer = await weights_of(Challenge("c", "1", get_weights=lambda: ready))
    assert answer == ready  # duplicates included: the shim, not the SDK, refuses them


async def test_hook_failure_is_internal_with_its_message() -> None:
    def broken() -> dict[str, float]:
        raise RuntimeError("database is gone")

    error = await error_of(
        lambda c: c.GetWeights(weights_request(), timeout=10),
        Challenge("c", "1", get_weights=broken),
    )
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == "get_weights failed: RuntimeError: database is gone"


async def test_hook_returning_the_wrong_type_is_internal() -> None:
    error = await error_of(
        lambda c: c.GetWeights(weights_request(), timeout=10),
        Challenge("c", "1", get_weights=cast(Any, lambda: [ALICE])),
    )
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == (
        "get_weights failed: TypeError: the weights hook must return a mapping hotkey -> score, "
        "Weights or GetWeightsResponse; got list"
    )


async def test_malformed_request_is_invalid_argument() -> None:
    error = await error_of(
        lambda c: c.GetWeights(challenge_pb2.GetWeightsRequest(epoch=1), timeout=10),
        Challenge("c", "1", get_weights=dict),
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "epoch_id: must not be empty"


async def test_token_is_checked_when_given() -> None:
    challenge = Challenge("c", "1", get_weights=dict)
    async with served(challenge, token=TOKEN) as client:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.GetWeights(
                weights_request(), metadata=(("authorization", "Bearer nope"),), timeout=10
            )
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert info.value.details() == "invalid challenge token"
        answer = await client.GetWeights(weights_request(), metadata=AUTH, timeout=10)
        assert len(answer.entries) == 0


@pytest.mark.parametrize(
    ("hook", "status", "message"),
    [
        (None, challenge_pb2.HEALTH_STATUS_SERVING, ""),
        (lambda: True, challenge_pb2.HEALTH_STATUS_SERVING, ""),
        (lambda: False, challenge_pb2.HEALTH_STATUS_NOT_SERVING, ""),
        (
            lambda: HealthReport(HealthState.STARTING, "loading tasks"),
            challenge_pb2.HEALTH_STATUS_STARTING,
            "loading tasks",
        ),
        (
            lambda: 1 / 0,
            challenge_pb2.HEALTH_STATUS_NOT_SERVING,
            "health check failed: ZeroDivisionError: division by zero",
        ),
    ],
    ids=["no-hook", "true", "false", "report", "raises"],
)
async def test_health(hook: Any, status: int, message: str) -> None:
    async with served(Challenge("c", "1", get_weights=dict, health=hook)) as client:
        answer = await client.Health(challenge_pb2.HealthRequest(), timeout=10)
    assert (answer.status, answer.message) == (status, message)


async def test_info_declares_capabilities_and_merges_metadata() -> None:
    challenge = Challenge(
        "c", "2.1.0", get_weights=dict, broker=True, metadata={"model": "x", "tasks": 1}
    )

    @challenge.health
    async def health() -> bool:
        return True

    @challenge.info
    async def info() -> dict[str, Any]:
        return {"tasks": 42, "ratio": 0.5, "beta": True}

    async with served(challenge) as client:
        answer = await client.GetInfo(challenge_pb2.GetInfoRequest(), timeout=10)
    assert answer.api_version == "v1"
    assert answer.challenge_version == "2.1.0"
    assert list(answer.capabilities) == [
        challenge_pb2.CHALLENGE_CAPABILITY_WEIGHTS,
        challenge_pb2.CHALLENGE_CAPABILITY_HEALTH,
        challenge_pb2.CHALLENGE_CAPABILITY_BROKER,
    ]
    assert answer.metadata["model"].string_value == "x"
    assert answer.metadata["tasks"].int_value == 42
    assert answer.metadata["ratio"].double_value == 0.5
    assert answer.metadata["beta"].bool_value is True
    assert not answer.HasField("shim")


async def test_a_challenge_needs_a_weights_hook() -> None:
    with pytest.raises(ValueError, match="no weights hook"):
        await Challenge("c", "1").start("127.0.0.1:0")
