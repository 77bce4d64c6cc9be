"""gRPC server plumbing shared by every platform server.

* :class:`CallGuard`, the one interceptor: authenticates each call by the
  ``(auth)`` policy its method declares in the proto contract, records metrics,
  and turns :class:`~platform_common.refusals.Refusal` into a precise status.
* :class:`Server`: a ``grpc.aio`` server with health, reflection, keepalive
  settings clients may rely on, and a graceful shutdown (health NOT_SERVING
  first, then streams closed, then the grace period).
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from platform_common import metrics, tokens
from platform_common.config import join_host_port
from platform_common.health import SERVING, Health
from platform_common.refusals import Refusal
from platform_common.status import to_grpc_status
from platform_network.v1 import common_pb2

log = logging.getLogger(__name__)

AuthPolicy = common_pb2.AuthPolicy
PUBLIC_METHODS = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    }
)

# Server-side keepalive: clients (validators) may ping every 10 s, even with no
# call in flight, without being sent GOAWAY "too_many_pings".
KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
)


@dataclass(frozen=True)
class Caller:
    """Who made the current call, as established by :class:`CallGuard`."""

    kind: str  # "anonymous", "admin", "challenge", "validator"
    subject: str = ""


CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar(
    "caller",
    default=Caller("anonymous"),  # noqa: B039 - Caller is frozen
)

Metadata = tuple[tuple[str, str | bytes], ...]
if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
# Returns the caller, or raises Unauthenticated.
Authenticator = Callable[[str, Metadata], Awaitable[Caller]]


class Unauthenticated(Exception):
    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED,
        reason: str = "invalid",
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


def method_policies(services: Iterable[ServiceDescriptor]) -> dict[str, int]:
    """Full method name -> AuthPolicy, read from each method's ``(auth)`` option."""
    out: dict[str, int] = {}
    for service in services:
        for method in service.methods:
            policy = method.GetOptions().Extensions[common_pb2.auth]
            if policy == AuthPolicy.AUTH_POLICY_UNSPECIFIED:
                raise ValueError(f"{service.full_name}.{method.name} declares no (auth) policy")
            out[f"/{service.full_name}/{method.name}"] = policy
    return out


class AdminToken:
    """The operators' bearer token, kept only as a SHA-256 digest."""

    def __init__(self, token: str) -> None:
        if len(token) < 16:
            raise ValueError("the admin token must be at least 16 characters")
        self._digest = tokens.digest(token)

    async def __call__(self, method: str, metadata: Metadata) -> Caller:
        presented = tokens.bearer(metadata)
        if presented is None:
            raise Unauthenticated(
                "missing credentials: send metadata 'authorization: Bearer <admin token>'",
                reason="missing",
            )
        if not tokens.matches(presented, self._digest):
            raise Unauthenticated("invalid admin token", reason="invalid_token")
        return Caller("admin")


class CallGuard(grpc.aio.ServerInterceptor):
    """Authenticate by declared policy, count, time, and map refusals to statuses."""

    def __init__(
        self,
        policies: Mapping[str, int],
        authenticators: Mapping[int, Authenticator],
    ) -> None:
        self._policies = dict(policies)
        self._authenticators = dict(authenticators)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        metadata: Metadata = tuple(handler_call_details.invocation_metadata or ())
        try:
            caller = await self._authenticate(method, metadata)
        except Unauthenticated as exc:
            metrics.GRPC_AUTH_FAILURES.labels(method, exc.reason).inc()
            metrics.GRPC_REQUESTS.labels(method, exc.code.name).inc()
            return _refusing(handler, exc.code, str(exc))
        return _wrap(handler, method, caller)

    async def _authenticate(self, method: str, metadata: Metadata) -> Caller:
        if method in PUBLIC_METHODS:
            return Caller("anonymous")
        # Methods outside the contract (none today) are admin-only by default.
        policy = self._policies.get(method, AuthPolicy.AUTH_POLICY_ADMIN)
        if policy == AuthPolicy.AUTH_POLICY_PUBLIC:
            return Caller("anonymous")
        chain = [policy]
        if policy == AuthPolicy.AUTH_POLICY_VALIDATOR:
            # Operators may do whatever validators do.
            chain.append(AuthPolicy.AUTH_POLICY_ADMIN)
        first_error: Unauthenticated | None = None
        for candidate in chain:
            authenticate = self._authenticators.get(candidate)
            if authenticate is None:
                continue
            try:
                return await authenticate(method, metadata)
            except Unauthenticated as exc:
                first_error = first_error or exc
        if first_error is not None:
            raise first_error
        name = AuthPolicy.Name(policy)  # type: ignore[arg-type]
        raise Unauthenticated(f"this server accepts no {name} credentials", reason="unsupported")


def _refusing(handler: Handler, code: grpc.StatusCode, message: str) -> Handler:
    async def deny(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)

    return _rebuild(handler, deny)


def _wrap(handler: Handler, method: str, caller: Caller) -> Handler:
    behavior = _behavior(handler)
    if handler.response_streaming and inspect.isasyncgenfunction(behavior):

        async def stream(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            CALLER.set(caller)
            code = "OK"
            try:
                async for item in behavior(request, context):
                    yield item
            except Refusal as refusal:
                code = refusal.kind.value
                await context.abort_with_status(to_grpc_status(refusal))
            except BaseException as exc:
                code = _code_of(exc, context)
                raise
            finally:
                metrics.GRPC_REQUESTS.labels(method, code).inc()

        return _rebuild(handler, stream)

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        CALLER.set(caller)
        started = time.perf_counter()
        code = "OK"
        try:
            return await behavior(request, context)
        except Refusal as refusal:
            code = refusal.kind.value
            await context.abort_with_status(to_grpc_status(refusal))
        except BaseException as exc:
            code = _code_of(exc, context)
            raise
        finally:
            metrics.GRPC_REQUESTS.labels(method, code).inc()
            if not handler.response_streaming:
                metrics.GRPC_LATENCY.labels(method).observe(time.perf_counter() - started)

    return _rebuild(handler, unary)


def _code_of(exc: BaseException, context: grpc.aio.ServicerContext[Any, Any]) -> str:
    if isinstance(exc, grpc.aio.AbortError):
        code = context.code()
        return code.name if isinstance(code, grpc.StatusCode) else "ABORTED_BY_HANDLER"
    if isinstance(exc, Exception):
        log.exception("unhandled error in gRPC handler")
        return "INTERNAL"
    return "CANCELLED"


def _behavior(handler: Handler) -> Callable[..., Any]:
    for name in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        behavior = getattr(handler, name)
        if behavior is not None:
            return behavior  # type: ignore[no-any-return]
    raise ValueError("handler has no behavior")


def _rebuild(handler: Handler, behavior: Callable[..., Any]) -> Handler:
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(behavior, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(behavior, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(behavior, **kwargs)
    return grpc.unary_unary_rpc_method_handler(behavior, **kwargs)


class Server:
    """A grpc.aio server with health, reflection and an orderly shutdown."""

    def __init__(
        self,
        *,
        interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
        max_concurrent_rpcs: int | None = None,
        options: Iterable[tuple[str, Any]] = (),
    ) -> None:
        self._server = grpc.aio.server(
            interceptors=tuple(interceptors),
            maximum_concurrent_rpcs=max_concurrent_rpcs,
            options=KEEPALIVE_OPTIONS + tuple(options),
        )
        self.health = Health()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        self._service_names: list[str] = [
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        ]
        self._healthy: list[str] = [self._service_names[0]]
        self._on_shutdown: list[Callable[[], Awaitable[None]]] = []
        self.port = 0

    @property
    def grpc_server(self) -> grpc.aio.Server:
        return self._server

    def add_service(
        self,
        descriptor: ServiceDescriptor,
        register: Callable[[grpc.aio.Server], None],
        *,
        served: bool = True,
    ) -> None:
        """Register a service; ``served=False`` publishes its contract (reflection)
        without reporting it SERVING in health, for services not implemented yet."""
        register(self._server)
        self._service_names.append(descriptor.full_name)
        if served:
            self._healthy.append(descriptor.full_name)

    def on_shutdown(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` after health turns NOT_SERVING, before the grace period."""
        self._on_shutdown.append(callback)

    async def start(self, host: str, port: int) -> int:
        reflection.enable_server_reflection(
            [*self._service_names, reflection.SERVICE_NAME], self._server
        )
        address = join_host_port(host, port)
        self.port = self._server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        await self._server.start()
        for name in ["", *self._healthy]:
            self.health.set(name, SERVING)
        return self.port

    async def stop(self, grace: float) -> None:
        """NOT_SERVING, end streams cleanly, then stop accepting and drain for ``grace`` s."""
        self.health.enter_graceful_shutdown()
        for callback in self._on_shutdown:
            try:
                await callback()
            except Exception:
                log.exception("shutdown step failed")
        await self._server.stop(grace)

    async def wait(self) -> None:
        await self._server.wait_for_termination()


def not_served_yet(base: type[Any], descriptor: ServiceDescriptor) -> Any:
    """An instance of the generated servicer ``base`` whose every method answers
    UNIMPLEMENTED with a message naming it: the contract is published (reflection,
    ``grpcurl describe``) before its implementation lands."""

    def make(name: str) -> Callable[..., Any]:
        message = f"{descriptor.full_name}.{name} is part of the contract but not served yet"

        # A coroutine (not a generator) serves streaming methods too: it aborts first.
        async def refuse(
            self: Any, _request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> Any:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

        return refuse

    methods = {m.name: make(m.name) for m in descriptor.methods}
    return type(f"NotServed{descriptor.name}", (base,), methods)()
