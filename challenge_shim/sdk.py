"""The Python SDK of a challenge: serve ChallengeInternal from a few hooks.

A challenge keeps its scores in memory and hands them over when asked::

    from challenge_shim.sdk import Challenge, WeightsRequest

    challenge = Challenge(name="term-bench", version="1.2.0")

    @challenge.weights
    async def weights(request: WeightsRequest) -> dict[str, float]:
        return dict(scores)  # hotkey (SS58) -> raw score >= 0

    challenge.run("127.0.0.1:50070", token=os.environ.get("CHALLENGE_TOKEN"))

Hooks may be ``async`` or plain functions. ``weights`` may take the
:class:`WeightsRequest` or nothing, and returns a mapping ``hotkey -> score``, a
:class:`Weights` (scores plus a ``scoring_version`` label) or a ready
``GetWeightsResponse``. ``health`` returns ``True``/``False`` or a
:class:`HealthReport`; ``info`` returns extra GetInfo metadata. The SDK answers
GetInfo with api_version "v1" and the declared capabilities, and when given the
challenge token it refuses calls without it (UNAUTHENTICATED), as the shim does.

The SDK does not validate scores: the shim in front of the challenge does, and its
refusals name the offending entry (see docs/challenges.md).

:func:`broker_channel` and :func:`broker_stub` reach the master's Broker through the
shim's local broker door, whose address the platform sets in ``PLATFORM_BROKER_ADDR``.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

import grpc

from challenge_shim.auth import ChallengeToken
from platform_common import refusals, rpc
from platform_common.answers import request_violations
from platform_common.config import join_host_port, parse_host_port
from platform_common.protos import Scalar, scalar_to_proto
from platform_common.status import to_grpc_status
from platform_network.v1 import (
    broker_pb2_grpc,
    challenge_pb2,
    challenge_pb2_grpc,
)

log = logging.getLogger(__name__)

API_VERSION = "v1"
BROKER_ADDR_ENV = "PLATFORM_BROKER_ADDR"
SERVICE = challenge_pb2.DESCRIPTOR.services_by_name["ChallengeInternal"]
Context = grpc.aio.ServicerContext[Any, Any]
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class WeightsRequest:
    """Context of one GetWeights call; a challenge may ignore all of it."""

    epoch: int
    epoch_id: str
    netuid: int
    metagraph_block: int
    #: Seconds the challenge has to answer, or ``None`` when the call has no deadline.
    time_budget: float | None


@dataclass(frozen=True)
class Weights:
    """Scores with the label of the scoring that produced them."""

    scores: Mapping[str, float]
    scoring_version: str = ""


class HealthState(enum.IntEnum):
    """Serving states a health hook can report."""

    SERVING = challenge_pb2.HEALTH_STATUS_SERVING
    STARTING = challenge_pb2.HEALTH_STATUS_STARTING
    NOT_SERVING = challenge_pb2.HEALTH_STATUS_NOT_SERVING
    DRAINING = challenge_pb2.HEALTH_STATUS_DRAINING


@dataclass(frozen=True)
class HealthReport:
    """A health hook's answer with a message for operators."""

    state: HealthState
    message: str = ""


WeightsAnswer: TypeAlias = Mapping[str, float] | Weights | challenge_pb2.GetWeightsResponse
HealthAnswer: TypeAlias = bool | HealthReport
WeightsHook: TypeAlias = Callable[..., WeightsAnswer | Awaitable[WeightsAnswer]]
HealthHook: TypeAlias = Callable[[], HealthAnswer | Awaitable[HealthAnswer]]
InfoHook: TypeAlias = Callable[[], Mapping[str, Scalar] | Awaitable[Mapping[str, Scalar]]]


class Challenge:
    """A challenge's ChallengeInternal server, built from hooks.

    Hooks are given here or set with the decorators :meth:`weights`, :meth:`health`
    and :meth:`info`. ``broker`` and ``public_http`` declare the matching
    capabilities (informational); WEIGHTS is always declared, HEALTH when a health
    hook is set. ``metadata`` are static GetInfo facts; the ``info`` hook's answer is
    merged over them.
    """

    def __init__(
        self,
        name: str,
        version: str,
        *,
        get_weights: WeightsHook | None = None,
        health: HealthHook | None = None,
        info: InfoHook | None = None,
        broker: bool = False,
        public_http: bool = False,
        metadata: Mapping[str, Scalar] | None = None,
    ) -> None:
        self.name = name
        self.version = version
        self.weights_hook = get_weights
        self.health_hook = health
        self.info_hook = info
        self.broker = broker
        self.public_http = public_http
        self.metadata: dict[str, Scalar] = dict(metadata or {})

    def weights(self, hook: F) -> F:
        """Decorator: set the hook that answers GetWeights."""
        self.weights_hook = hook
        return hook

    def health(self, hook: F) -> F:
        """Decorator: set the hook that answers Health."""
        self.health_hook = hook
        return hook

    def info(self, hook: F) -> F:
        """Decorator: set the hook that adds metadata to GetInfo."""
        self.info_hook = hook
        return hook

    def capabilities(self) -> list[challenge_pb2.ChallengeCapability.ValueType]:
        """The capabilities GetInfo declares."""
        out = [challenge_pb2.CHALLENGE_CAPABILITY_WEIGHTS]
        if self.health_hook is not None:
            out.append(challenge_pb2.CHALLENGE_CAPABILITY_HEALTH)
        if self.broker:
            out.append(challenge_pb2.CHALLENGE_CAPABILITY_BROKER)
        if self.public_http:
            out.append(challenge_pb2.CHALLENGE_CAPABILITY_PUBLIC_HTTP)
        return out

    async def start(
        self, address: str, *, token: str | None = None, grace: float = 5.0
    ) -> RunningChallenge:
        """Listen on ``address`` (``HOST:PORT``, port 0 picks one) and serve in the
        background; return a handle with the bound port and ``stop()``."""
        if self.weights_hook is None:
            raise ValueError("no weights hook: pass get_weights= or decorate one with @weights")
        servicer = _Servicer(self)
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if token:
            interceptors.append(
                rpc.CallGuard(
                    rpc.method_policies([SERVICE]),
                    {rpc.AuthPolicy.AUTH_POLICY_MASTER: ChallengeToken(token, self.name)},
                )
            )
        server = rpc.Server(interceptors=interceptors)
        server.add_service(
            SERVICE,
            lambda s: challenge_pb2_grpc.add_ChallengeInternalServicer_to_server(servicer, s),
        )
        host, port = parse_host_port(address, "address")
        bound = await server.start(host, port)
        running = RunningChallenge(server, join_host_port(host, bound), bound, grace)
        log.info(
            "challenge serving",
            extra={"challenge": self.name, "version": self.version, "address": running.address},
        )
        return running

    async def serve(self, address: str, *, token: str | None = None, grace: float = 5.0) -> None:
        """Serve until SIGTERM or SIGINT (or cancellation), then stop gracefully."""
        running = await self.start(address, token=token, grace=grace)
        try:
            await wait_for_signal()
        finally:
            await running.stop()

    def run(self, address: str, *, token: str | None = None, grace: float = 5.0) -> None:
        """Blocking :meth:`serve`, for a ``main()``."""
        asyncio.run(self.serve(address, token=token, grace=grace))


class RunningChallenge:
    """A started challenge server."""

    def __init__(self, server: rpc.Server, address: str, port: int, grace: float) -> None:
        self._server = server
        self.address = address
        self.port = port
        self._grace = grace

    async def stop(self) -> None:
        """Stop accepting calls and let in-flight ones finish within the grace period."""
        await self._server.stop(self._grace)


async def wait_for_signal() -> None:
    """Return when SIGTERM or SIGINT arrives."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


async def _call_hook(hook: Callable[..., Any], *args: Any) -> Any:
    result = hook(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


def _wants_request(hook: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(hook).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature
        return False
    return any(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in parameters
    )


def _to_response(answer: Any) -> challenge_pb2.GetWeightsResponse:
    if isinstance(answer, challenge_pb2.GetWeightsResponse):
        return answer
    label = ""
    if isinstance(answer, Weights):
        answer, label = answer.scores, answer.scoring_version
    if not isinstance(answer, Mapping):
        raise TypeError(
            "the weights hook must return a mapping hotkey -> score, Weights or "
            f"GetWeightsResponse; got {type(answer).__name__}"
        )
    response = challenge_pb2.GetWeightsResponse()
    # Entries added in place: a third of the cost of building WeightEntry messages
    # and copying them into the response (256 entries: 150 us against 430 us).
    add = response.entries.add
    for hotkey, score in answer.items():
        if not isinstance(hotkey, str) or isinstance(score, bool):
            raise TypeError(f"entry {hotkey!r}: expected str -> number; got {score!r}")
        add(hotkey=hotkey, score=float(score))
    response.scoring_version = label
    return response


class _Servicer(challenge_pb2_grpc.ChallengeInternalServicer):
    def __init__(self, challenge: Challenge) -> None:
        self._challenge = challenge
        # (hook, whether it takes the request): inspecting a signature costs more
        # than the rest of the call's own work, so it is done once per hook.
        self._signature: tuple[Callable[..., Any] | None, bool] = (None, False)

    def _wants_request(self, hook: Callable[..., Any]) -> bool:
        known, wants = self._signature
        if known is not hook:
            wants = _wants_request(hook)
            self._signature = (hook, wants)
        return wants

    async def GetWeights(
        self, request: challenge_pb2.GetWeightsRequest, context: Context
    ) -> challenge_pb2.GetWeightsResponse:
        violations = request_violations(request)
        if violations:
            await context.abort_with_status(to_grpc_status(refusals.invalid(violations)))
        hook = self._challenge.weights_hook
        assert hook is not None  # checked at start
        budget = (
            request.time_budget.ToTimedelta().total_seconds()
            if request.HasField("time_budget")
            else context.time_remaining()
        )
        args: tuple[Any, ...] = ()
        if self._wants_request(hook):
            args = (
                WeightsRequest(
                    epoch=request.epoch,
                    epoch_id=request.epoch_id,
                    netuid=request.netuid,
                    metagraph_block=request.metagraph_block,
                    time_budget=budget,
                ),
            )
        try:
            return _to_response(await _call_hook(hook, *args))
        except Exception as exc:
            log.exception("weights hook failed", extra={"epoch": request.epoch})
            await context.abort(
                grpc.StatusCode.INTERNAL, f"get_weights failed: {type(exc).__name__}: {exc}"
            )
            raise  # unreachable: abort raises

    async def Health(
        self, request: challenge_pb2.HealthRequest, context: Context
    ) -> challenge_pb2.HealthResponse:
        hook = self._challenge.health_hook
        if hook is None:
            return challenge_pb2.HealthResponse(status=challenge_pb2.HEALTH_STATUS_SERVING)
        try:
            answer = await _call_hook(hook)
        except Exception as exc:
            log.exception("health hook failed")
            return challenge_pb2.HealthResponse(
                status=challenge_pb2.HEALTH_STATUS_NOT_SERVING,
                message=f"health check failed: {type(exc).__name__}: {exc}",
            )
        if isinstance(answer, HealthReport):
            return challenge_pb2.HealthResponse(status=answer.state.value, message=answer.message)
        serving = challenge_pb2.HEALTH_STATUS_SERVING
        return challenge_pb2.HealthResponse(
            status=serving if answer else challenge_pb2.HEALTH_STATUS_NOT_SERVING
        )

    async def GetInfo(
        self, request: challenge_pb2.GetInfoRequest, context: Context
    ) -> challenge_pb2.GetInfoResponse:
        challenge = self._challenge
        metadata: dict[str, Scalar] = dict(challenge.metadata)
        if challenge.info_hook is not None:
            try:
                metadata.update(await _call_hook(challenge.info_hook))
            except Exception as exc:
                log.exception("info hook failed")
                await context.abort(
                    grpc.StatusCode.INTERNAL, f"info failed: {type(exc).__name__}: {exc}"
                )
        return challenge_pb2.GetInfoResponse(
            api_version=API_VERSION,
            challenge_version=challenge.version,
            capabilities=challenge.capabilities(),
            metadata={key: scalar_to_proto(value) for key, value in metadata.items()},
        )


def broker_channel(address: str | None = None) -> grpc.aio.Channel:
    """A channel to the shim's broker door: ``address``, else ``$PLATFORM_BROKER_ADDR``."""
    target = address or os.environ.get(BROKER_ADDR_ENV, "")
    if not target:
        raise RuntimeError(
            f"no broker door address: set {BROKER_ADDR_ENV} (the platform sets it in the "
            "challenge's pod when the shim's broker door is enabled)"
        )
    return grpc.aio.insecure_channel(target)


def broker_stub(channel: grpc.aio.Channel | None = None) -> broker_pb2_grpc.BrokerAsyncStub:
    """A Broker stub over ``channel`` (default: :func:`broker_channel`)."""
    return broker_pb2_grpc.BrokerStub(channel or broker_channel())
