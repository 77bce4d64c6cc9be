"""The broker door: a loopback gRPC endpoint serving ``platform_network.v1.Broker`` to the
challenge in the same pod, forwarding every call to the master's Broker.

The door presents the challenge's token (``authorization: Bearer <challenge token>``)
and names the challenge (``x-platform-challenge: <slug>``), so the challenge never
holds master credentials. Whatever metadata the challenge sends is not forwarded:
it cannot present another token. Calls are forwarded as raw bytes (no parsing), the
challenge's deadline is kept, and the master's status, message and details (such as
``grpc-status-details-bin``) come back unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc

from challenge_shim import metrics
from platform_common.config import join_host_port
from platform_network.v1 import broker_pb2

log = logging.getLogger(__name__)

SERVICE = broker_pb2.DESCRIPTOR.services_by_name["Broker"]
SLUG_METADATA = "x-platform-challenge"
# Job specs carry up to 1 MiB of files and lists carry many jobs: above gRPC's 4 MiB.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_MESSAGE_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
)
if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
Context = grpc.aio.ServicerContext[Any, Any]
# Trailing metadata the door passes back: status details; never transport headers.
_PASSED_BACK = ("grpc-status-details-bin",)


class BrokerDoor:
    """Serve Broker on a loopback address, forwarding to the master with the token."""

    def __init__(self, master_address: str, token: str, slug: str) -> None:
        self._metadata: tuple[tuple[str, str], ...] = (
            ("authorization", f"Bearer {token}"),
            (SLUG_METADATA, slug),
        )
        self._channel = grpc.aio.insecure_channel(master_address, options=_MESSAGE_OPTIONS)
        self._server = grpc.aio.server(options=_MESSAGE_OPTIONS)
        handlers: dict[str, Handler] = {}
        for method in SERVICE.methods:
            full = f"/{SERVICE.full_name}/{method.name}"
            if method.server_streaming:
                handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                    self._streaming(full, method.name)
                )
            else:
                handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                    self._unary(full, method.name)
                )
        self._server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)]
        )
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (port 0 picks one); return the port."""
        address = join_host_port(host, port)
        self.port = self._server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        await self._server.start()
        return self.port

    async def stop(self, grace: float) -> None:
        await self._server.stop(grace)
        await self._channel.close()

    def _unary(self, full: str, name: str) -> Callable[[bytes, Context], Any]:
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self._channel.unary_unary(full)

        async def forward(request: bytes, context: Context) -> bytes:
            try:
                response: bytes = await call(
                    request, metadata=self._metadata, timeout=context.time_remaining()
                )
            except grpc.aio.AioRpcError as exc:
                await _pass_back(name, exc, context)
                raise  # unreachable: abort raises
            metrics.BROKER_CALLS.labels(name, "OK").inc()
            return response

        return forward

    def _streaming(self, full: str, name: str) -> Callable[[bytes, Context], AsyncIterator[bytes]]:
        open_stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = self._channel.unary_stream(
            full
        )

        async def forward(request: bytes, context: Context) -> AsyncIterator[bytes]:
            call = open_stream(request, metadata=self._metadata, timeout=context.time_remaining())
            try:
                async for item in call:
                    yield item
            except grpc.aio.AioRpcError as exc:
                await _pass_back(name, exc, context)
            finally:
                # The challenge went away (or the stream ended): stop the upstream call too.
                call.cancel()
            metrics.BROKER_CALLS.labels(name, "OK").inc()

        return forward


async def _pass_back(name: str, exc: grpc.aio.AioRpcError, context: Context) -> None:
    metrics.BROKER_CALLS.labels(name, exc.code().name).inc()
    log.info(
        "broker call refused upstream",
        extra={"method": name, "code": exc.code().name, "reason": exc.details()},
    )
    trailing = tuple(
        (key, value) for key, value in exc.trailing_metadata() or () if key in _PASSED_BACK
    )
    await context.abort(exc.code(), exc.details() or "", trailing)
