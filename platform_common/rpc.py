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
import hmac
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from platform_common import callauth, metrics, tokens
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

    kind: str  # "anonymous", "admin", "challenge", "validator", "edge"
    subject: str = ""
    # For a signed call: the SHA-256 (hex) of the request the signature covers; the
    # guard refuses the call when the request it received hashes differently.
    body_sha256: str = ""


CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar(
    "caller",
    default=Caller("anonymous"),  # noqa: B039 - Caller is frozen
)

Metadata = tuple[tuple[str, str | bytes], ...]
Context = grpc.aio.ServicerContext[Any, Any]
if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
# Returns the caller, or raises Unauthenticated.
Authenticator = Callable[[str, Metadata], Awaitable[Caller]]
# The check of one method: returns the caller of a call with this metadata, or raises
# Unauthenticated.
Admission = Callable[[Metadata], Awaitable[Caller]]
ANONYMOUS = Caller("anonymous")
# Guarded handlers a CallGuard keeps (one per method served).
_MAX_GUARDED_METHODS = 4096


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
    """A deployment-wide bearer token, kept only as a SHA-256 digest: the operators'
    (``kind="admin"``) or the edge's (``kind="edge"``, presented by the platform's Envoy)."""

    def __init__(self, token: str, kind: str = "admin") -> None:
        if len(token) < 16:
            raise ValueError(f"the {kind} token must be at least 16 characters")
        self._digest = tokens.digest(token)
        self._kind = kind

    async def __call__(self, method: str, metadata: Metadata) -> Caller:
        presented = tokens.bearer(metadata)
        if presented is None:
            raise Unauthenticated(
                f"missing credentials: send metadata 'authorization: Bearer <{self._kind} token>'",
                reason="missing",
            )
        if not tokens.matches(presented, self._digest):
            raise Unauthenticated(f"invalid {self._kind} token", reason="invalid_token")
        return Caller(self._kind)


class CallGuard(grpc.aio.ServerInterceptor):
    """Authenticate by declared policy, count, time, and map refusals to statuses.

    The work is done by a guarded copy of each method's handler, built once per
    method (:meth:`guard`) and reused for every call; the guarded handler hands the
    caller to the service through the :data:`CALLER` context variable. A
    :class:`Server` applies its guards to the handlers as they are registered, so
    that no interceptor runs per call (in ``grpc.aio`` an interceptor costs a chain
    of coroutines on every call); passed to a plain ``grpc.aio`` server, the guard
    works as an interceptor that hands out the same prebuilt handlers.
    """

    def __init__(
        self,
        policies: Mapping[str, int],
        authenticators: Mapping[int, Authenticator],
    ) -> None:
        self._policies = dict(policies)
        self._authenticators = dict(authenticators)
        # method -> (the handler guarded, its guarded copy). Bounded: a catch-all
        # generic handler could serve any method name a client makes up.
        self._guarded: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return self.guard(handler_call_details.method, handler)

    def guard(self, method: str, handler: Handler) -> Handler:
        """``handler`` behind this guard: the caller authenticated by ``method``'s
        policy, the call counted and timed, refusals mapped to their status. Built
        on first use and reused as long as the same handler serves ``method``."""
        cached = self._guarded.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        guarded = _guarded(handler, method, self._admission(method))
        if method in self._guarded or len(self._guarded) < _MAX_GUARDED_METHODS:
            self._guarded[method] = (handler, guarded)
        return guarded

    async def _authenticate(self, method: str, metadata: Metadata) -> Caller:
        """Who is calling ``method`` with ``metadata``; raises :class:`Unauthenticated`."""
        admit = self._admission(method)
        return ANONYMOUS if admit is None else await admit(metadata)

    def _admission(self, method: str) -> Admission | None:
        """The check every call of ``method`` must pass, resolved once per method:
        ``None`` for a public method (no credentials are read), else a coroutine
        function that tries the policy's authenticators in order (validator methods
        accept operators too) and raises the first refusal."""
        if method in PUBLIC_METHODS:
            return None
        # Methods outside the contract (none today) are admin-only by default.
        policy = self._policies.get(method, AuthPolicy.AUTH_POLICY_ADMIN)
        if policy == AuthPolicy.AUTH_POLICY_PUBLIC:
            return None
        chain = [policy]
        if policy == AuthPolicy.AUTH_POLICY_VALIDATOR:
            # Operators may do whatever validators do.
            chain.append(AuthPolicy.AUTH_POLICY_ADMIN)
        candidates = [
            authenticate
            for candidate in chain
            if (authenticate := self._authenticators.get(candidate)) is not None
        ]
        if not candidates:
            name = AuthPolicy.Name(policy)  # type: ignore[arg-type]
            unsupported = f"this server accepts no {name} credentials"

            async def refuse(metadata: Metadata) -> Caller:
                raise Unauthenticated(unsupported, reason="unsupported")

            return refuse
        if len(candidates) == 1:
            only = candidates[0]

            async def admit_one(metadata: Metadata) -> Caller:
                return await only(method, metadata)

            return admit_one

        async def admit_any(metadata: Metadata) -> Caller:
            first_error: Unauthenticated | None = None
            for authenticate in candidates:
                try:
                    return await authenticate(method, metadata)
                except Unauthenticated as exc:
                    first_error = first_error or exc
            assert first_error is not None  # candidates is not empty
            raise first_error

        return admit_any


def _guarded(handler: Handler, method: str, admit: Admission | None) -> Handler:
    """A copy of ``handler`` whose behavior admits the caller first (``admit``;
    ``None`` for a public method), then runs the original with :data:`CALLER` set,
    counting the outcome and timing unary answers. What depends only on the method
    (metric children, the kind of behavior) is resolved here, once."""
    behavior = _behavior(handler)
    outcome = _Outcome(method)
    if handler.response_streaming and inspect.isasyncgenfunction(behavior):
        return _rebuild(handler, _guarded_stream(behavior, admit, outcome))
    return _rebuild(handler, _guarded_call(behavior, admit, outcome, handler.response_streaming))


class _Outcome:
    """The metrics of one method, with the children of its common labels bound once."""

    def __init__(self, method: str) -> None:
        self._method = method
        self._ok = metrics.GRPC_REQUESTS.labels(method, "OK")
        self.latency = metrics.GRPC_LATENCY.labels(method)

    def count(self, code: str) -> None:
        if code == "OK":
            self._ok.inc()
        else:
            metrics.GRPC_REQUESTS.labels(self._method, code).inc()

    async def refuse(self, context: Context, exc: Unauthenticated) -> None:
        """Count a call refused by authentication and end it with the refusal."""
        metrics.GRPC_AUTH_FAILURES.labels(self._method, exc.reason).inc()
        self.count(exc.code.name)
        await context.abort(exc.code, str(exc))


def _signed_body(caller: Caller, request: Any) -> Caller:
    """``caller``, once the request is the one its signature covers (signed calls only)."""
    if caller.body_sha256 and not hmac.compare_digest(
        callauth.body_digest(request), caller.body_sha256
    ):
        raise Unauthenticated(
            "the request does not match the signed body hash (x-platform-body-sha256)",
            reason="body_mismatch",
        )
    return caller


def _metadata(context: Context) -> Metadata:
    return tuple(context.invocation_metadata() or ())


def _guarded_stream(
    behavior: Callable[..., AsyncIterator[Any]], admit: Admission | None, outcome: _Outcome
) -> Callable[[Any, Context], AsyncIterator[Any]]:
    async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
        caller = ANONYMOUS
        if admit is not None:
            try:
                caller = _signed_body(await admit(_metadata(context)), request)
            except Unauthenticated as exc:
                await outcome.refuse(context, exc)
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
            outcome.count(code)

    return stream


def _guarded_call(
    behavior: Callable[..., Awaitable[Any]],
    admit: Admission | None,
    outcome: _Outcome,
    response_streaming: bool,
) -> Callable[[Any, Context], Awaitable[Any]]:
    latency = outcome.latency

    async def call(request: Any, context: Context) -> Any:
        caller = ANONYMOUS
        if admit is not None:
            try:
                caller = _signed_body(await admit(_metadata(context)), request)
            except Unauthenticated as exc:
                await outcome.refuse(context, exc)
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
            outcome.count(code)
            if not response_streaming:
                latency.observe(time.perf_counter() - started)

    return call


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
        reuse_port: bool = False,
    ) -> None:
        """``reuse_port`` lets other processes listen on the same port (SO_REUSEPORT;
        the kernel spreads new connections among them). gRPC core turns it on by
        default on Linux, so that a second server started on a port in use would
        silently take half its connections; here it is off unless asked for, and
        such a start fails instead."""
        interceptors = tuple(interceptors)
        # Guards are applied to each handler once, as it is registered, instead of
        # running as interceptors on every call. Any other interceptor keeps them all
        # interceptors, so that the order they were given in still holds.
        guards = tuple(i for i in interceptors if isinstance(i, CallGuard))
        if len(guards) < len(interceptors):
            guards = ()
        server = grpc.aio.server(
            interceptors=() if guards else interceptors,
            maximum_concurrent_rpcs=max_concurrent_rpcs,
            options=(
                *KEEPALIVE_OPTIONS,
                ("grpc.so_reuseport", 1 if reuse_port else 0),
                *options,
            ),
        )
        self._server = GuardedServer(server, guards)
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
        try:
            self.port = self._server.add_insecure_port(address)
        except RuntimeError:  # gRPC's message only points at GRPC_VERBOSITY
            self.port = 0
        if self.port == 0:
            raise OSError(
                f"cannot listen on {address}: the port is in use or the address is not this host's"
            )
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


class GuardedServer(grpc.aio.Server):
    """A ``grpc.aio`` server that guards every handler as it is registered and
    serves registered methods from one table.

    Handlers are guarded whichever way they are registered (a generated
    ``add_*Servicer_to_server``, health, reflection), so none can be served
    unguarded; the first guard is the outermost, as the first interceptor would be.

    Methods registered with :meth:`add_registered_method_handlers` are answered by
    one generic handler holding them all, looked up first (so they keep precedence
    over other generic handlers, as registered methods have), and are not registered
    with gRPC core as such. The reason is the cost: for each registered method,
    ``grpc.aio``'s accept loop keeps a pending request future, and on every accepted
    call it waits on all of them with ``asyncio.wait``. With the master's thirty-odd
    methods that wait cost about a sixth of a small call's CPU (measured with
    callgrind: 110,000 of 705,000 instructions); with one table it is one future.
    """

    def __init__(self, server: grpc.aio.Server, guards: Sequence[CallGuard] = ()) -> None:
        self._server = server
        self._guards = tuple(reversed(guards))
        self._table = _MethodTable()
        server.add_generic_rpc_handlers((self._table,))

    def _guard(self, method: str, handler: Handler) -> Handler:
        for guard in self._guards:
            handler = guard.guard(method, handler)
        return handler

    def add_generic_rpc_handlers(
        self, generic_rpc_handlers: Iterable[grpc.GenericRpcHandler]
    ) -> None:
        handlers = tuple(generic_rpc_handlers)
        if self._guards:
            handlers = tuple(_GuardedGenericHandler(h, self._guard) for h in handlers)
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: Mapping[str, Handler]
    ) -> None:
        for name, handler in method_handlers.items():
            method = f"/{service_name}/{name}"
            self._table.handlers[method] = self._guard(method, handler)

    def add_insecure_port(self, address: str) -> int:
        return self._server.add_insecure_port(address)

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        return self._server.add_secure_port(address, server_credentials)

    async def start(self) -> None:
        await self._server.start()

    async def stop(self, grace: float | None) -> None:
        await self._server.stop(grace)

    # The signature is grpc.aio.Server's.
    async def wait_for_termination(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        return await self._server.wait_for_termination(timeout)


class _MethodTable(grpc.GenericRpcHandler):
    """Full method name -> handler, as one generic handler (a single dict lookup)."""

    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        return self.handlers.get(handler_call_details.method)


class _GuardedGenericHandler(grpc.GenericRpcHandler):
    """A generic handler whose answers go through a guard (built once per method)."""

    def __init__(
        self, inner: grpc.GenericRpcHandler, guard: Callable[[str, Handler], Handler]
    ) -> None:
        self._inner = inner
        self._guard = guard

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        return self._guard(handler_call_details.method, handler)


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
