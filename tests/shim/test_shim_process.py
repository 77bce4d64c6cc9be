"""``platform shim`` processes in front of the real example challenges, both transports.

One shim per transport for the whole module; the challenge behind it is replaced,
on the same port, by one started with the fault a test needs (``--fault``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from bittensor.sp_core import Keypair

from challenge_shim.service import platform_version
from platform_common import not_serving
from platform_network.v1 import challenge_pb2, challenge_pb2_grpc
from tests.shim.support import (
    AUTH,
    HOTKEY_HEADER,
    Process,
    details,
    http_challenge,
    native_challenge,
    port_of,
    preconditions,
    shim,
    stub,
    wait_reachable,
    weights_request,
)
from tests.support import metrics

pytestmark = pytest.mark.process

ALICE = Keypair.create_from_uri("//Alice").ss58_address
BOB = Keypair.create_from_uri("//Bob").ss58_address
BAD_HOTKEY = ALICE[:-1] + "Z"  # what the examples' bad-ss58 fault sends
MAX_DEADLINE = 1.5


def task_sum(task_id: int) -> int:
    """The examples' task: the sum of a fixed linear congruential sequence."""
    state, total = task_id, 0
    for _ in range(5):
        state = (state * 1_103_515_245 + 12_345) % 2**31
        total += state % 1000
    return total


@dataclass
class Stack:
    """A shim, the challenge currently behind it, and a client of the shim."""

    transport: str
    workdir: Path
    shim: Process
    challenge: Process
    client: challenge_pb2_grpc.ChallengeInternalAsyncStub
    channel: grpc.aio.Channel
    challenge_port: int
    fault: str = ""
    retired: list[Process] = field(default_factory=list)

    @property
    def public(self) -> str:
        ready = self.challenge.ready
        return str(ready.get("public") or ready["listen"])

    def make_challenge(self, fault: str) -> Process:
        if self.transport == "grpc":
            return native_challenge(self.workdir, fault, self.challenge_port)
        return http_challenge(self.workdir, fault, self.challenge_port)

    async def use(self, fault: str) -> None:
        """Put a challenge with ``fault`` ("" for none) behind the shim."""
        if fault == self.fault and self.challenge.proc and self.challenge.proc.poll() is None:
            return
        # Faulty challenges are disposable: no need for a graceful stop.
        self.challenge.kill()
        self.retired.append(self.challenge)
        self.challenge = self.make_challenge(fault)
        await asyncio.to_thread(self.challenge.start)
        self.fault = fault
        await wait_reachable(self.client)


@pytest.fixture(scope="module", params=["grpc", "http"])
async def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    transport = str(request.param)
    workdir = tmp_path_factory.mktemp(f"shim-{transport}")
    challenge = native_challenge(workdir) if transport == "grpc" else http_challenge(workdir)
    front: Process | None = None
    built: Stack | None = None
    try:
        ready = await asyncio.to_thread(challenge.start)
        address = str(ready.get("internal") or ready["listen"])
        front = shim(
            workdir,
            address,
            "--max-deadline",
            str(MAX_DEADLINE),
            transport=transport,
            name=f"shim-{transport}",
        )
        await asyncio.to_thread(front.start)
        channel = grpc.aio.insecure_channel(front.ready["listen"])
        built = Stack(
            transport, workdir, front, challenge, stub(channel), channel, port_of(address)
        )
        yield built
    finally:
        if built is not None:
            await built.channel.close()
            for old in built.retired:
                old.kill()
            built.challenge.stop()
        if front is not None:
            front.stop()
        challenge.stop()


async def get_weights_error(stack: Stack, deadline: float = 10) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stack.client.GetWeights(weights_request(), metadata=AUTH, timeout=deadline)
    return info.value


# --- happy path --------------------------------------------------------------------


async def test_get_weights_returns_the_challenges_scores(stack: Stack) -> None:
    await stack.use("")
    async with aiohttp.ClientSession() as session:
        for hotkey, task_id, total in [
            (ALICE, 1, task_sum(1)),
            (ALICE, 2, task_sum(2)),
            (BOB, 1, task_sum(1)),
            (BOB, 2, task_sum(2) + 1),  # wrong: no point
        ]:
            async with session.post(
                f"http://{stack.public}/submit",
                json={"task_id": task_id, "answer": total},
                headers={HOTKEY_HEADER: hotkey},
            ) as response:
                assert response.status == 200, await response.text()
    answer = await stack.client.GetWeights(weights_request(), metadata=AUTH, timeout=10)
    assert {e.hotkey: e.score for e in answer.entries} == {ALICE: 2.0, BOB: 1.0}
    assert answer.scoring_version == "sum-v1"


async def test_get_info_carries_shim_info(stack: Stack) -> None:
    await stack.use("")
    info = await stack.client.GetInfo(challenge_pb2.GetInfoRequest(), metadata=AUTH, timeout=10)
    assert info.api_version == "v1"
    assert info.challenge_version == "1.0.0"
    assert info.shim.version == platform_version()
    assert info.shim.max_deadline.ToTimedelta().total_seconds() == MAX_DEADLINE
    assert info.shim.max_entries == 65_536
    assert info.shim.max_response_bytes == 8 * 1024 * 1024
    if stack.transport == "grpc":
        assert info.shim.transport == challenge_pb2.CHALLENGE_TRANSPORT_GRPC
        assert list(info.capabilities) == [
            challenge_pb2.CHALLENGE_CAPABILITY_WEIGHTS,
            challenge_pb2.CHALLENGE_CAPABILITY_HEALTH,
            challenge_pb2.CHALLENGE_CAPABILITY_PUBLIC_HTTP,
        ]
        assert info.metadata["task_size"].int_value == 5
    else:
        assert info.shim.transport == challenge_pb2.CHALLENGE_TRANSPORT_HTTP
        assert list(info.capabilities) == [
            challenge_pb2.CHALLENGE_CAPABILITY_WEIGHTS,
            challenge_pb2.CHALLENGE_CAPABILITY_HEALTH,
            challenge_pb2.CHALLENGE_CAPABILITY_HTTP_COMPAT,
        ]
        assert info.metadata["slug"].string_value == "sum-bench"
        assert info.metadata["contract"].int_value == 1


async def test_health_is_serving(stack: Stack) -> None:
    await stack.use("")
    health = await stack.client.Health(challenge_pb2.HealthRequest(), metadata=AUTH, timeout=10)
    assert health.status == challenge_pb2.HEALTH_STATUS_SERVING


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ((), "missing credentials: send metadata 'authorization: Bearer <challenge token>'"),
        ((("authorization", "Bearer wrong-token-0123456789abcdef"),), "invalid challenge token"),
        (
            (("authorization", "Basic " + AUTH[0][1][7:]),),
            "missing credentials: send metadata 'authorization: Bearer <challenge token>'",
        ),
    ],
    ids=["missing", "wrong", "not-bearer"],
)
async def test_token_is_required_on_every_method(
    stack: Stack, metadata: tuple[tuple[str, str], ...], message: str
) -> None:
    calls: list[Awaitable[Any]] = [
        stack.client.GetWeights(weights_request(), metadata=metadata, timeout=10),
        stack.client.Health(challenge_pb2.HealthRequest(), metadata=metadata, timeout=10),
        stack.client.GetInfo(challenge_pb2.GetInfoRequest(), metadata=metadata, timeout=10),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert info.value.details() == message


async def test_malformed_request_is_invalid_argument(stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stack.client.GetWeights(
            challenge_pb2.GetWeightsRequest(epoch=0, epoch_id="e"), metadata=AUTH, timeout=10
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "epoch: must be >= 1; got 0"


# --- faults ------------------------------------------------------------------------

FAILED = grpc.StatusCode.FAILED_PRECONDITION
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize(
    ("fault", "code", "message", "violation"),
    [
        (
            "nan",
            FAILED,
            "entries[0].score: must be finite and >= 0; got NaN",
            "WEIGHTS_INVALID_SCORE",
        ),
        (
            "inf",
            FAILED,
            "entries[0].score: must be finite and >= 0; got inf",
            "WEIGHTS_INVALID_SCORE",
        ),
        (
            "negative",
            FAILED,
            "entries[0].score: must be finite and >= 0; got -1.0",
            "WEIGHTS_INVALID_SCORE",
        ),
        (
            "bad-ss58",
            FAILED,
            f'entries[0].hotkey: not a valid SS58 address (bad checksum); got "{BAD_HOTKEY}"',
            "WEIGHTS_INVALID_HOTKEY",
        ),
        (
            "duplicate",
            FAILED,
            f'entries[1].hotkey: duplicate of entries[0].hotkey; got "{ALICE}"',
            "WEIGHTS_DUPLICATE_HOTKEY",
        ),
        (
            "bad-label",
            FAILED,
            "scoring_version: at most 128 characters; got 200",
            "WEIGHTS_INVALID_LABEL",
        ),
        # 100,000 entries fit in 8 MiB: the entry count refuses them.
        ("huge:100000", EXHAUSTED, "entries: at most 65536 allowed; got 100000", None),
    ],
)
async def test_invalid_answers_are_refused(
    stack: Stack, fault: str, code: grpc.StatusCode, message: str, violation: str | None
) -> None:
    await stack.use(fault)
    error = await get_weights_error(stack)
    assert error.code() == code
    assert error.details() == message
    subject, _, description = message.partition(": ")
    expected = [(violation, subject, description)] if violation else []
    assert preconditions(error) == expected


async def test_a_million_entries_are_refused_by_size(stack: Stack) -> None:
    await stack.use("huge")
    error = await get_weights_error(stack)
    assert error.code() == EXHAUSTED
    # The byte size is known before anything is parsed (gRPC: the message length;
    # HTTP: Content-Length), so that rule fires first: 61 bytes per protobuf entry,
    # 57 per JSON member.
    size = 61_000_000 if stack.transport == "grpc" else 57 * 1_000_000 + 13
    assert error.details() == f"response: at most 8388608 bytes allowed; got {size}"


async def test_refusals_are_counted_by_rule(stack: Stack) -> None:
    await stack.use("negative")

    def scrape() -> float:
        port = int(stack.shim.ready["metrics"])
        return metrics.value(port, "platform_shim_weights_refusals_total", rule="score")

    before = await asyncio.to_thread(scrape)
    await get_weights_error(stack)
    assert await asyncio.to_thread(scrape) == before + 1


async def test_challenge_error_is_unknown_with_its_message(stack: Stack) -> None:
    await stack.use("error")
    error = await get_weights_error(stack)
    assert error.code() == grpc.StatusCode.UNKNOWN
    if stack.transport == "grpc":
        assert error.details() == (
            "challenge answered INTERNAL: get_weights failed: RuntimeError: "
            "scores are being recomputed"
        )
    else:
        assert error.details() == "challenge answered HTTP 500: scores are being recomputed"


async def test_hung_challenge_is_cut_off_at_max_deadline(stack: Stack) -> None:
    await stack.use("hang")
    error = await get_weights_error(stack, deadline=30)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert error.details() == f"challenge did not answer within {MAX_DEADLINE:.3f} s"
    # The master's own, shorter deadline is honoured too.
    error = await get_weights_error(stack, deadline=0.5)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # Health is a separate path: a hung weights hook does not make it fail.
    health = await stack.client.Health(challenge_pb2.HealthRequest(), metadata=AUTH, timeout=10)
    assert health.status == challenge_pb2.HEALTH_STATUS_SERVING


async def test_unhealthy_challenge_is_not_serving(stack: Stack) -> None:
    await stack.use("unhealthy")
    health = await stack.client.Health(challenge_pb2.HealthRequest(), metadata=AUTH, timeout=10)
    assert health.status == challenge_pb2.HEALTH_STATUS_NOT_SERVING
    if stack.transport == "grpc":
        assert health.message == "fault injected: unhealthy"
    else:
        assert health.message == (
            'challenge answered HTTP 503: {"ok": false, "error": "fault injected"}'
        )
    # Not asked for weights: the call says why, in the form the master records.
    error = await get_weights_error(stack)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details(error) == f"health NOT_SERVING: {health.message}"
    assert not_serving.reason_of(error) == details(error)


async def test_crashed_challenge_is_unavailable(stack: Stack) -> None:
    await stack.use("crash")
    error = await get_weights_error(stack)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert details(error).startswith("challenge unreachable at ")
    assert str(stack.challenge_port) in details(error)
    assert stack.challenge.proc is not None
    assert await asyncio.to_thread(stack.challenge.proc.wait, 10) == 3
    # Not running any more: every method says so in its own way.
    error = await get_weights_error(stack)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert details(error).startswith("challenge unreachable at ")
    health = await stack.client.Health(challenge_pb2.HealthRequest(), metadata=AUTH, timeout=10)
    assert health.status == challenge_pb2.HEALTH_STATUS_NOT_SERVING
    assert health.message.startswith("challenge unreachable at ")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stack.client.GetInfo(challenge_pb2.GetInfoRequest(), metadata=AUTH, timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # The shim keeps serving and reaches the challenge again once it is back.
    await stack.use("")
    answer = await stack.client.GetWeights(weights_request(), metadata=AUTH, timeout=10)
    assert answer.scoring_version == "sum-v1"
