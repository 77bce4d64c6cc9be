"""The challenge as the shim reaches it on localhost: the gRPC transport, and what
every transport shares (the error type and its messages).

A transport turns whatever went wrong into :class:`ChallengeCallError` carrying
the status the contract prescribes (UNAVAILABLE, DEADLINE_EXCEEDED, UNKNOWN),
and a weights answer that breaks a rule into
:class:`~challenge_shim.validation.WeightsRefused`.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, Protocol

import grpc

from platform_common.answers import Limits, WeightsRefused, check_size, read_grpc_answer
from platform_network.v1 import challenge_pb2

ERROR_TEXT_MAX = 512
_SERVICE = "/platform_network.v1.ChallengeInternal/"
# How gRPC core reports an answer above the channel's receive limit.
_TOO_LARGE = re.compile(r"Received message larger than max \((\d+) vs\. \d+\)")
# UNAVAILABLE produced by the client's own transport, not sent by the challenge.
_TRANSPORT_FAILURE = re.compile(
    r"failed to connect|connection refused|connection reset|socket closed|broken pipe|"
    r"stream removed|connections to all backends failing|transport closed|goaway|"
    r"end of tcp stream|keepalive",
    re.IGNORECASE,
)
# A local sidecar: retry connecting quickly after the challenge restarts. Not
# ``grpc.min_reconnect_backoff_ms``: gRPC core takes it as the minimum time a connection
# attempt may take (default 20 s), so a small value abandons handshakes that are merely
# slow (a challenge starting up, a busy machine) and fails the call; the call's deadline
# bounds the wait anyway.
_CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.enable_retries", 0),
)


class ChallengeCallError(Exception):
    """A forwarded call that failed; ``code`` is what the shim answers the master."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def unreachable(address: str, detail: str) -> ChallengeCallError:
    return ChallengeCallError(
        grpc.StatusCode.UNAVAILABLE, f"challenge unreachable at {address}: {detail}"
    )


def too_slow(budget: float) -> ChallengeCallError:
    return ChallengeCallError(
        grpc.StatusCode.DEADLINE_EXCEEDED, f"challenge did not answer within {budget:.3f} s"
    )


def challenge_answered(what: str, message: str) -> ChallengeCallError:
    """UNKNOWN "challenge answered <code or HTTP status>: <message, at most 512 characters>"."""
    return ChallengeCallError(
        grpc.StatusCode.UNKNOWN, f"challenge answered {what}: {message[:ERROR_TEXT_MAX]}"
    )


Metadata = tuple[tuple[str, str], ...]


class Upstream(Protocol):
    """One transport to the challenge. Every method raises :class:`ChallengeCallError`."""

    transport: challenge_pb2.ChallengeTransport.ValueType

    async def get_weights(
        self, request: challenge_pb2.GetWeightsRequest, metadata: Metadata, budget: float
    ) -> challenge_pb2.GetWeightsResponse:
        """The validated answer; :class:`WeightsRefused` when it breaks a rule."""

    async def health(self, metadata: Metadata, budget: float) -> challenge_pb2.HealthResponse:
        """The challenge's own health answer (not yet sanitized)."""

    async def get_info(self, metadata: Metadata, budget: float) -> challenge_pb2.GetInfoResponse:
        """The challenge's own info answer (not yet sanitized, no ShimInfo)."""

    async def close(self) -> None:
        """Release connections."""


class GrpcUpstream:
    """The challenge's own ChallengeInternal server."""

    transport = challenge_pb2.CHALLENGE_TRANSPORT_GRPC

    def __init__(self, address: str, limits: Limits) -> None:
        self.address = address
        self._limits = limits
        # One byte above the limit: an answer of exactly the limit passes, a larger one
        # fails inside gRPC before it is buffered, with its size in the error.
        self._channel = grpc.aio.insecure_channel(
            address,
            options=(
                *_CHANNEL_OPTIONS,
                ("grpc.max_receive_message_length", limits.max_response_bytes + 1),
            ),
        )
        # Raw bytes (no deserializer): the size rule is checked before anything is parsed.
        self._get_weights: grpc.aio.UnaryUnaryMultiCallable[Any, bytes] = self._channel.unary_unary(
            _SERVICE + "GetWeights",
            request_serializer=challenge_pb2.GetWeightsRequest.SerializeToString,
        )
        self._health = self._channel.unary_unary(
            _SERVICE + "Health",
            request_serializer=challenge_pb2.HealthRequest.SerializeToString,
            response_deserializer=challenge_pb2.HealthResponse.FromString,
        )
        self._get_info = self._channel.unary_unary(
            _SERVICE + "GetInfo",
            request_serializer=challenge_pb2.GetInfoRequest.SerializeToString,
            response_deserializer=challenge_pb2.GetInfoResponse.FromString,
        )

    async def get_weights(
        self, request: challenge_pb2.GetWeightsRequest, metadata: Metadata, budget: float
    ) -> challenge_pb2.GetWeightsResponse:
        raw = await self._call(self._get_weights, request, metadata, budget, weights=True)
        assert isinstance(raw, bytes)
        return read_grpc_answer(raw, self._limits).response

    async def health(self, metadata: Metadata, budget: float) -> challenge_pb2.HealthResponse:
        try:
            answer = await self._call(self._health, challenge_pb2.HealthRequest(), metadata, budget)
        except ChallengeCallError as exc:
            if exc.message.startswith("challenge answered UNIMPLEMENTED"):
                # No health hook: a challenge that answers at all is serving.
                return challenge_pb2.HealthResponse(
                    status=challenge_pb2.HEALTH_STATUS_SERVING,
                    message="the challenge has no health check; it answers",
                )
            raise
        assert isinstance(answer, challenge_pb2.HealthResponse)
        return answer

    async def get_info(self, metadata: Metadata, budget: float) -> challenge_pb2.GetInfoResponse:
        answer = await self._call(self._get_info, challenge_pb2.GetInfoRequest(), metadata, budget)
        assert isinstance(answer, challenge_pb2.GetInfoResponse)
        return answer

    async def close(self) -> None:
        await self._channel.close()

    async def _call(
        self,
        method: Any,
        request: Any,
        metadata: Metadata,
        budget: float,
        *,
        weights: bool = False,
    ) -> Any:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            return await method(request, metadata=metadata, timeout=budget)
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or ""
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                too_large = _TOO_LARGE.search(details)
                if too_large is not None:
                    if weights:
                        check_size(int(too_large.group(1)), self._limits)
                    raise challenge_answered(
                        "a message larger than the shim accepts", details
                    ) from exc
            if code == grpc.StatusCode.DEADLINE_EXCEEDED and loop.time() - started >= budget * 0.99:
                raise too_slow(budget) from exc
            if code == grpc.StatusCode.UNAVAILABLE and _TRANSPORT_FAILURE.search(details):
                raise unreachable(self.address, details) from exc
            raise challenge_answered(code.name, details) from exc


__all__ = [
    "ChallengeCallError",
    "GrpcUpstream",
    "Metadata",
    "Upstream",
    "WeightsRefused",
    "challenge_answered",
    "too_slow",
    "unreachable",
]
