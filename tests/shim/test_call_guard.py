"""CallGuard as every platform server uses it: applied once per method when handlers
are registered (no interceptor per call), with the same refusals, caller and metrics
as when it runs as an interceptor.

The service here is made of raw-bytes handlers under made-up method names, so the
policies are given directly rather than read from a proto contract.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from platform_common import rpc
from platform_common.refusals import not_found
from tests.support.waiting import eventually

SERVICE = "test.guard.v1.Probe"
ADMIN_METHOD = f"/{SERVICE}/Admin"
OPEN_METHOD = f"/{SERVICE}/Open"
STREAM_METHOD = f"/{SERVICE}/Stream"
MISSING_METHOD = f"/{SERVICE}/Missing"
REFUSING_METHOD = f"/{SERVICE}/Refusing"
UNSUPPORTED_METHOD = f"/{SERVICE}/Validators"
TOKEN = "guard-test-admin-token-0123456789"
ADMIN = (("authorization", f"Bearer {TOKEN}"),)
POLICIES = {
    ADMIN_METHOD: rpc.AuthPolicy.AUTH_POLICY_ADMIN,
    OPEN_METHOD: rpc.AuthPolicy.AUTH_POLICY_PUBLIC,
    STREAM_METHOD: rpc.AuthPolicy.AUTH_POLICY_ADMIN,
    REFUSING_METHOD: rpc.AuthPolicy.AUTH_POLICY_ADMIN,
    UNSUPPORTED_METHOD: rpc.AuthPolicy.AUTH_POLICY_CHALLENGE,
}
Context = grpc.aio.ServicerContext[Any, Any]


async def who(request: bytes, context: Context) -> bytes:
    caller = rpc.CALLER.get()
    return f"{caller.kind}:{caller.subject}".encode()


async def stream(request: bytes, context: Context) -> AsyncIterator[bytes]:
    for _ in range(3):
        yield await who(request, context)


async def refusing(request: bytes, context: Context) -> bytes:
    raise not_found("nothing here")


def handlers() -> dict[str, rpc.Handler]:
    return {
        "Admin": grpc.unary_unary_rpc_method_handler(who),
        "Open": grpc.unary_unary_rpc_method_handler(who),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
        "Refusing": grpc.unary_unary_rpc_method_handler(refusing),
        "Validators": grpc.unary_unary_rpc_method_handler(who),
    }


def guard() -> rpc.CallGuard:
    return rpc.CallGuard(POLICIES, {rpc.AuthPolicy.AUTH_POLICY_ADMIN: rpc.AdminToken(TOKEN)})


class Recorder(grpc.aio.ServerInterceptor):
    """An interceptor that is not a CallGuard: it only records the methods called."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        self.methods.append(details.method)
        return await continuation(details)


async def start(
    *interceptors: grpc.aio.ServerInterceptor, registered: bool = True, generic: bool = True
) -> tuple[rpc.Server, grpc.aio.Channel]:
    server = rpc.Server(interceptors=interceptors)

    def register(s: grpc.aio.Server) -> None:
        if generic:
            s.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers()),))
        if registered:
            s.add_registered_method_handlers(SERVICE, handlers())

    # Registered on the underlying server directly: whichever way a handler arrives,
    # it is guarded.
    register(server.grpc_server)
    port = await server.start("127.0.0.1", 0)
    return server, grpc.aio.insecure_channel(f"127.0.0.1:{port}")


async def call(
    channel: grpc.aio.Channel, method: str, metadata: tuple[tuple[str, str], ...] = ()
) -> bytes:
    unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
    return await unary(b"", metadata=metadata)


async def call_stream(
    channel: grpc.aio.Channel, method: str, metadata: tuple[tuple[str, str], ...] = ()
) -> list[bytes]:
    streaming: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(method)
    return [reply async for reply in streaming(b"", metadata=metadata)]


async def refused(
    channel: grpc.aio.Channel, method: str, metadata: tuple[tuple[str, str], ...] = ()
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(channel, method, metadata)
    return info.value


def count(method: str, code: str) -> float:
    value = REGISTRY.get_sample_value(
        "platform_grpc_requests_total", {"method": method, "code": code}
    )
    return value or 0.0


def auth_failures(method: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "platform_grpc_auth_failures_total", {"method": method, "reason": reason}
    )
    return value or 0.0


async def check_the_contract(channel: grpc.aio.Channel) -> None:
    """What a guarded server answers, however the guard was applied."""
    assert await call(channel, ADMIN_METHOD, ADMIN) == b"admin:"
    assert await call(channel, OPEN_METHOD) == b"anonymous:"
    # A public method reads no credentials: a wrong token changes nothing.
    assert await call(channel, OPEN_METHOD, (("authorization", "Bearer nope"),)) == b"anonymous:"

    missing = await refused(channel, ADMIN_METHOD)
    assert missing.code() == grpc.StatusCode.UNAUTHENTICATED
    assert missing.details() == (
        "missing credentials: send metadata 'authorization: Bearer <admin token>'"
    )
    wrong = await refused(channel, ADMIN_METHOD, (("authorization", "Bearer nope"),))
    assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED
    assert wrong.details() == "invalid admin token"
    unsupported = await refused(channel, UNSUPPORTED_METHOD, ADMIN)
    assert unsupported.code() == grpc.StatusCode.UNAUTHENTICATED
    assert unsupported.details() == "this server accepts no AUTH_POLICY_CHALLENGE credentials"

    refusal = await refused(channel, REFUSING_METHOD, ADMIN)
    assert refusal.code() == grpc.StatusCode.NOT_FOUND
    assert refusal.details() == "nothing here"

    assert await call_stream(channel, STREAM_METHOD, ADMIN) == [b"admin:"] * 3
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call_stream(channel, STREAM_METHOD)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

    unknown = await refused(channel, MISSING_METHOD, ADMIN)
    assert unknown.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize(
    ("registered", "generic"),
    [(True, True), (True, False), (False, True)],
    ids=["both", "registered-only", "generic-only"],
)
async def test_every_registered_handler_is_guarded(registered: bool, generic: bool) -> None:
    server, channel = await start(guard(), registered=registered, generic=generic)
    try:
        await check_the_contract(channel)
    finally:
        await channel.close()
        await server.stop(0)


async def test_a_guard_among_other_interceptors_still_guards_every_call() -> None:
    recorder = Recorder()
    server, channel = await start(recorder, guard())
    try:
        await check_the_contract(channel)
        assert ADMIN_METHOD in recorder.methods  # the other interceptor ran too
    finally:
        await channel.close()
        await server.stop(0)


async def test_a_guard_works_as_a_plain_interceptor() -> None:
    server = grpc.aio.server(interceptors=[guard()])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers()),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        await check_the_contract(channel)
    finally:
        await channel.close()
        await server.stop(0)


async def test_health_stays_public() -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server, channel = await start(guard())
    try:
        answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await channel.close()
        await server.stop(0)


async def test_guarded_handlers_are_built_once_per_method() -> None:
    keeper = guard()
    handler = handlers()["Admin"]
    first = keeper.guard(ADMIN_METHOD, handler)
    assert keeper.guard(ADMIN_METHOD, handler) is first
    # Another handler for the method (a server rebuilt) gets its own guarded copy.
    other = handlers()["Admin"]
    assert keeper.guard(ADMIN_METHOD, other) is not first
    assert keeper.guard(ADMIN_METHOD, other) is keeper.guard(ADMIN_METHOD, other)


async def test_calls_and_refusals_are_counted() -> None:
    server, channel = await start(guard())
    try:
        ok, unauthenticated = count(ADMIN_METHOD, "OK"), count(ADMIN_METHOD, "UNAUTHENTICATED")
        not_found_before = count(REFUSING_METHOD, "NOT_FOUND")
        missing = auth_failures(ADMIN_METHOD, "missing")
        await call(channel, ADMIN_METHOD, ADMIN)
        await call(channel, ADMIN_METHOD, ADMIN)
        await refused(channel, ADMIN_METHOD)
        await refused(channel, REFUSING_METHOD, ADMIN)

        # The client can see a refusal's status before the server has counted it (the
        # count follows the abort), so the counters are read until they settle.
        async def counted() -> bool:
            return (
                count(ADMIN_METHOD, "OK") == ok + 2
                and count(ADMIN_METHOD, "UNAUTHENTICATED") == unauthenticated + 1
                and count(REFUSING_METHOD, "NOT_FOUND") == not_found_before + 1
                and auth_failures(ADMIN_METHOD, "missing") == missing + 1
            )

        await eventually(counted, "every call and refusal counted once", within=10)
        # And not more than once.
        await asyncio.sleep(0.1)
        assert await counted()
    finally:
        await channel.close()
        await server.stop(0)
