"""Collection of every ACTIVE challenge's raw scores, through its shim.

Each challenge gets one call with one budget (the collection deadline): its shim
checks the challenge's health, then forwards for the weights answer. Each answer is
validated and digested as it arrives, while other challenges are still answering.
Everything that can go wrong with one challenge
(unreachable, hung, crashing, lying, wrong token, unhealthy) ends as a
:class:`Collected` with a failure and a reason; nothing raised by one
challenge can delay or break the others.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from platform_common import not_serving, vectors
from platform_common.answers import Limits, WeightsRefused, read_grpc_answer
from platform_common.protos import duration
from platform_network.v1 import challenge_pb2, weights_pb2

log = logging.getLogger(__name__)

Failure = weights_pb2.ChallengeFailure
GET_WEIGHTS = "/platform_network.v1.ChallengeInternal/GetWeights"
LIMITS = Limits()  # the contract's default limits (65,536 entries, 8 MiB)
# A little above the answer limit, so an oversized answer reaches the master's own
# check (or is refused by the shim with its precise message) instead of failing the
# call with a transport error.
MAX_RECEIVE_BYTES = LIMITS.max_response_bytes + 1024 * 1024
MAX_REASON = 1024

_FAILURES = {
    grpc.StatusCode.DEADLINE_EXCEEDED: Failure.CHALLENGE_FAILURE_TIMEOUT,
    grpc.StatusCode.UNAVAILABLE: Failure.CHALLENGE_FAILURE_UNREACHABLE,
    grpc.StatusCode.UNAUTHENTICATED: Failure.CHALLENGE_FAILURE_AUTH,
    grpc.StatusCode.PERMISSION_DENIED: Failure.CHALLENGE_FAILURE_AUTH,
    grpc.StatusCode.FAILED_PRECONDITION: Failure.CHALLENGE_FAILURE_INVALID_RESPONSE,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Failure.CHALLENGE_FAILURE_INVALID_RESPONSE,
}


@dataclass(frozen=True)
class Target:
    """One challenge to collect: where its shim listens and the token it expects."""

    slug: str
    address: str | None  # None: the challenge has no running instance
    token: str | None  # None: the master cannot present its token


@dataclass(frozen=True)
class Collected:
    slug: str
    entries: tuple[tuple[str, float], ...] | None  # None when FAILED
    failure: int  # ChallengeFailure; UNSPECIFIED when entries is not None
    reason: str
    size_bytes: int
    scoring_version: str
    latency: float
    raw_sha256: bytes = b""  # vectors.raw_answer_digest of the entries; b"" when FAILED


class Collector:
    """Calls shims; keeps one channel per shim address across epochs."""

    def __init__(self, *, timeout: float) -> None:
        self.timeout = timeout
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close(None)

    async def collect(
        self,
        targets: Sequence[Target],
        request: challenge_pb2.GetWeightsRequest,
    ) -> list[Collected]:
        """Collect every target concurrently; the result is in the targets' order.

        Returns within the collection deadline (plus scheduling slack) whatever the
        challenges do: every call carries a gRPC deadline and the whole gathering
        is bounded by an asyncio timeout too.
        """
        self._forget_unused({t.address for t in targets if t.address})
        if not targets:
            return []
        tasks = [asyncio.create_task(self._one(t, request)) for t in targets]
        done, pending = await asyncio.wait(tasks, timeout=self.timeout + 1.0)
        for task in pending:
            task.cancel()
        results = []
        for target, task in zip(targets, tasks, strict=True):
            if task in done and not task.cancelled() and task.exception() is None:
                results.append(task.result())
            else:
                results.append(
                    _failed(target.slug, Failure.CHALLENGE_FAILURE_TIMEOUT, self._late(), 0.0)
                )
        return results

    def _late(self) -> str:
        return f"no answer within {self.timeout:g}s"

    async def _one(
        self,
        target: Target,
        request: challenge_pb2.GetWeightsRequest,
    ) -> Collected:
        slug = target.slug
        start = time.monotonic()
        if target.address is None:
            return _failed(
                slug, Failure.CHALLENGE_FAILURE_INTERNAL, "no running instance to collect from", 0
            )
        if target.token is None:
            return _failed(
                slug,
                Failure.CHALLENGE_FAILURE_AUTH,
                "the master cannot present this challenge's token (issued before derived "
                "tokens); rotate it with RotateChallengeToken",
                0,
            )
        metadata = (("authorization", f"Bearer {target.token}"),)
        try:
            ask = challenge_pb2.GetWeightsRequest()
            ask.CopyFrom(request)
            ask.time_budget.CopyFrom(duration(self.timeout))
            # One call: the shim asks the challenge's Health first and forwards only to
            # a SERVING challenge. Raw bytes: the answer's size is recorded as received,
            # then parsed once.
            get_weights: grpc.aio.UnaryUnaryMultiCallable[
                challenge_pb2.GetWeightsRequest, bytes
            ] = self._channel(target.address).unary_unary(
                GET_WEIGHTS,
                request_serializer=challenge_pb2.GetWeightsRequest.SerializeToString,
            )
            raw: bytes = await get_weights(ask, timeout=self.timeout, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            unhealthy = not_serving.reason_of(exc)
            if unhealthy is not None:
                return _failed(
                    slug, Failure.CHALLENGE_FAILURE_UNHEALTHY, unhealthy, time.monotonic() - start
                )
            code = exc.code()
            failure = _FAILURES.get(code, Failure.CHALLENGE_FAILURE_ERROR)
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                reason = self._late()
            else:
                reason = f"{code.name}: {exc.details() or ''}"
            return _failed(slug, failure, reason, time.monotonic() - start)
        latency = time.monotonic() - start
        try:
            # The same rules the shim applied: the master trusts no pod.
            answer = read_grpc_answer(raw, LIMITS)
        except WeightsRefused as refused:
            return _failed(
                slug, Failure.CHALLENGE_FAILURE_INVALID_RESPONSE, refused.message, latency
            )
        # The entries as validation read them: reading a parsed message's fields
        # again would cost as much as reading them the first time.
        entries = tuple(zip(answer.hotkeys, answer.scores, strict=True))
        return Collected(
            slug,
            entries,
            Failure.CHALLENGE_FAILURE_UNSPECIFIED,
            "",
            len(raw),
            answer.response.scoring_version,
            latency,
            vectors.raw_answer_digest(entries),
        )

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(
                address,
                options=(
                    ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
                    # Fail fast and retry the connection at the next epoch rather
                    # than waiting out a long reconnect backoff.
                    ("grpc.initial_reconnect_backoff_ms", 200),
                    ("grpc.max_reconnect_backoff_ms", 2000),
                ),
            )
            self._channels[address] = channel
        return channel

    def _forget_unused(self, addresses: set[str]) -> None:
        for address in list(self._channels):
            if address not in addresses:
                channel = self._channels.pop(address)
                asyncio.get_running_loop().create_task(channel.close(None))


def _failed(slug: str, failure: int, reason: str, latency: float) -> Collected:
    if len(reason) > MAX_REASON:
        reason = reason[: MAX_REASON - 3] + "..."
    return Collected(slug, None, failure, reason, 0, "", latency)
