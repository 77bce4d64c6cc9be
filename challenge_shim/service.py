"""ChallengeInternal as the shim serves it to the master.

Each call is forwarded to the challenge with the deadline
``min(the master's remaining deadline, max_deadline)``, its failures mapped to the
statuses the contract lists, and every weights answer validated before it leaves.
A challenge is asked for weights only once its ``Health`` says SERVING; otherwise
the call fails as :mod:`platform_common.not_serving` describes.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from challenge_shim import metrics
from challenge_shim.upstream import ChallengeCallError, Metadata, Upstream
from platform_common import not_serving, refusals
from platform_common.answers import Limits, WeightsRefused, request_violations
from platform_common.protos import duration
from platform_network.v1 import challenge_pb2, challenge_pb2_grpc

log = logging.getLogger(__name__)

HEALTH_MESSAGE_MAX = 1024
VERSION_MAX = 128
METADATA_KEYS_MAX = 32
METADATA_VALUE_MAX = 512
_METADATA_KEY = re.compile(r"[a-z][a-z0-9_]{0,62}")
SLUG_METADATA = "x-platform-challenge-slug"
T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]


def platform_version() -> str:
    """Version of the platform distribution this shim belongs to."""
    try:
        return version("platform-network")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0.0.0"


def refusal_status(refused: WeightsRefused) -> grpc.Status:
    """The rich status of a refused answer: PreconditionFailure details for rules 2-6."""
    status = status_pb2.Status(code=getattr(code_pb2, refused.code), message=refused.message)
    if refused.violation_type is not None:
        detail = error_details_pb2.PreconditionFailure(
            violations=[
                error_details_pb2.PreconditionFailure.Violation(
                    type=refused.violation_type, subject=v.subject, description=v.description
                )
                for v in refused.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    result: grpc.Status = rpc_status.to_status(status)
    return result


class ShimService(challenge_pb2_grpc.ChallengeInternalServicer):
    """Forwards ChallengeInternal to the challenge through ``upstream``."""

    def __init__(
        self,
        upstream: Upstream,
        *,
        slug: str,
        limits: Limits,
        max_deadline: float,
        health_timeout: float,
    ) -> None:
        self._upstream = upstream
        self._slug = slug
        self._limits = limits
        self._max_deadline = max_deadline
        self._health_timeout = health_timeout
        self._draining = False
        self._shim_info = challenge_pb2.ShimInfo(
            version=platform_version(),
            transport=upstream.transport,
            max_deadline=duration(max_deadline),
            max_entries=limits.max_entries,
            max_response_bytes=limits.max_response_bytes,
        )

    def drain(self) -> None:
        """Refuse new calls with UNAVAILABLE from now on (the shim is shutting down)."""
        self._draining = True

    async def GetWeights(
        self, request: challenge_pb2.GetWeightsRequest, context: Context
    ) -> challenge_pb2.GetWeightsResponse:
        await self._refuse_if_draining(context)
        violations = request_violations(request)
        if violations:
            raise refusals.invalid(violations)
        try:
            health = await self._checked_health(context)
        except ChallengeCallError as exc:
            # Unreachable or failing: the same status as the weights call would get.
            await context.abort(exc.code, exc.message)
        if health.status != challenge_pb2.HEALTH_STATUS_SERVING:
            state = challenge_pb2.HealthStatus.Name(health.status).removeprefix("HEALTH_STATUS_")
            metrics.CHALLENGE_CALLS.labels("GetWeights", "not_serving").inc()
            log.warning(
                "weights not asked: the challenge is not serving",
                extra={
                    "slug": self._slug,
                    "epoch": request.epoch,
                    "health": state,
                    "reason": health.message,
                },
            )
            await context.abort_with_status(not_serving.status(state, health.message))
        budget = await self._timeout(context, self._max_deadline)
        forwarded = challenge_pb2.GetWeightsRequest()
        forwarded.CopyFrom(request)
        # The budget the challenge really has: the deadline the shim forwards with.
        forwarded.time_budget.CopyFrom(duration(budget))
        try:
            answer = await self._forward(
                "GetWeights",
                context,
                lambda md: self._upstream.get_weights(forwarded, md, budget),
            )
        except WeightsRefused as refused:
            metrics.WEIGHTS_REFUSALS.labels(refused.rule.value).inc()
            metrics.CHALLENGE_CALLS.labels("GetWeights", "refused").inc()
            log.warning(
                "weights answer refused",
                extra={
                    "slug": self._slug,
                    "epoch": request.epoch,
                    "rule": refused.rule.value,
                    "reason": refused.message,
                },
            )
            await context.abort_with_status(refusal_status(refused))
            raise  # unreachable: abort raises
        log.info(
            "weights answer forwarded",
            extra={"slug": self._slug, "epoch": request.epoch, "entries": len(answer.entries)},
        )
        return answer

    async def Health(
        self, request: challenge_pb2.HealthRequest, context: Context
    ) -> challenge_pb2.HealthResponse:
        await self._refuse_if_draining(context)
        try:
            return await self._checked_health(context)
        except ChallengeCallError as exc:
            # Health never fails because of the challenge: the cause is the message.
            return _not_serving(exc.message)

    async def _checked_health(self, context: Context) -> challenge_pb2.HealthResponse:
        """The challenge's health answer; one that takes longer than ``--health-timeout``
        is NOT_SERVING. The master's own deadline running out first aborts the call with
        DEADLINE_EXCEEDED; other failures raise ChallengeCallError."""
        remaining = context.time_remaining()
        master_binds = remaining is not None and remaining < self._health_timeout
        try:
            return await self._health_answer(context)
        except ChallengeCallError as exc:
            if exc.code != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
            if master_binds:
                await context.abort(exc.code, exc.message)
            return _not_serving(exc.message)

    async def _health_answer(self, context: Context) -> challenge_pb2.HealthResponse:
        """The challenge's own health answer, within ``--health-timeout``; raises
        ChallengeCallError when the challenge cannot be asked."""
        budget = await self._timeout(context, min(self._health_timeout, self._max_deadline))
        answer = await self._forward(
            "Health", context, lambda md: self._upstream.health(md, budget)
        )
        if answer.status not in (
            challenge_pb2.HEALTH_STATUS_SERVING,
            challenge_pb2.HEALTH_STATUS_STARTING,
            challenge_pb2.HEALTH_STATUS_NOT_SERVING,
            challenge_pb2.HEALTH_STATUS_DRAINING,
        ):
            return challenge_pb2.HealthResponse(
                status=challenge_pb2.HEALTH_STATUS_NOT_SERVING,
                message=f"challenge answered health status {answer.status} (not a serving state)",
            )
        return challenge_pb2.HealthResponse(
            status=answer.status, message=answer.message[:HEALTH_MESSAGE_MAX]
        )

    async def GetInfo(
        self, request: challenge_pb2.GetInfoRequest, context: Context
    ) -> challenge_pb2.GetInfoResponse:
        await self._refuse_if_draining(context)
        budget = await self._timeout(context, self._max_deadline)
        answer = await self._forward(
            "GetInfo", context, lambda md: self._upstream.get_info(md, budget)
        )
        return self._sanitized_info(answer)

    def _sanitized_info(
        self, answer: challenge_pb2.GetInfoResponse
    ) -> challenge_pb2.GetInfoResponse:
        capabilities: list[challenge_pb2.ChallengeCapability.ValueType] = []
        for capability in answer.capabilities:
            if capability == challenge_pb2.CHALLENGE_CAPABILITY_HTTP_COMPAT and (
                self._upstream.transport != challenge_pb2.CHALLENGE_TRANSPORT_HTTP
            ):
                continue  # set by the shim only
            if capability not in capabilities and capability != 0:
                capabilities.append(capability)
        out = challenge_pb2.GetInfoResponse(
            api_version=answer.api_version[:VERSION_MAX],
            challenge_version=answer.challenge_version[:VERSION_MAX],
            capabilities=capabilities,
            shim=self._shim_info,
        )
        kept = 0
        for key in sorted(answer.metadata):
            value = answer.metadata[key]
            if kept >= METADATA_KEYS_MAX or not _METADATA_KEY.fullmatch(key):
                continue
            if value.WhichOneof("kind") is None:
                continue
            if value.WhichOneof("kind") == "string_value" and (
                len(value.string_value) > METADATA_VALUE_MAX
            ):
                continue
            out.metadata[key].CopyFrom(value)
            kept += 1
        return out

    async def _refuse_if_draining(self, context: Context) -> None:
        if self._draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the shim is shutting down")

    async def _timeout(self, context: Context, ceiling: float) -> float:
        remaining = context.time_remaining()
        budget = ceiling if remaining is None else min(remaining, ceiling)
        if budget <= 0:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED, "the call's deadline had passed on arrival"
            )
        return budget

    def _metadata(self, context: Context) -> Metadata:
        """What the challenge receives: the master's authorization, and the slug."""
        out: list[tuple[str, str]] = [(SLUG_METADATA, self._slug)]
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str):
                out.append((key, value))
        return tuple(out)

    async def _forward(
        self,
        method: str,
        context: Context,
        call: Callable[[Metadata], Awaitable[T]],
    ) -> T:
        started = time.perf_counter()
        try:
            result = await call(self._metadata(context))
        except ChallengeCallError as exc:
            outcome = {
                grpc.StatusCode.UNAVAILABLE: "unavailable",
                grpc.StatusCode.DEADLINE_EXCEEDED: "deadline_exceeded",
            }.get(exc.code, "challenge_error")
            metrics.CHALLENGE_CALLS.labels(method, outcome).inc()
            log.warning(
                "challenge call failed",
                extra={
                    "slug": self._slug,
                    "method": method,
                    "code": exc.code.name,
                    "reason": exc.message,
                },
            )
            if method == "Health":
                raise
            await context.abort(exc.code, exc.message)
            raise  # unreachable: abort raises
        except (WeightsRefused, asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            # Never let a shim bug reach the master as UNKNOWN, which means "the challenge".
            metrics.CHALLENGE_CALLS.labels(method, "internal").inc()
            log.exception("shim fault", extra={"slug": self._slug, "method": method})
            await context.abort(
                grpc.StatusCode.INTERNAL, f"shim fault: {type(exc).__name__}: {exc}"
            )
            raise  # unreachable: abort raises
        finally:
            metrics.CHALLENGE_LATENCY.labels(method).observe(time.perf_counter() - started)
        metrics.CHALLENGE_CALLS.labels(method, "ok").inc()
        return result


def _not_serving(cause: str) -> challenge_pb2.HealthResponse:
    return challenge_pb2.HealthResponse(
        status=challenge_pb2.HEALTH_STATUS_NOT_SERVING, message=cause[:HEALTH_MESSAGE_MAX]
    )
