"""``grpc.health.v1.Health`` with a shutdown that ends Watch streams.

The stock asyncio servicer keeps Watch streams open through shutdown, so a
server drains for its whole grace period waiting on health watchers. Here,
entering shutdown sends NOT_SERVING to every watcher and then ends its stream
with UNAVAILABLE, like every other platform watch stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

# Servingint values (the health stubs are untyped, so plain ints).
SERVING: int = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: int = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN: int = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class Health(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self._status: dict[str, int] = {}
        self._changed: asyncio.Future[None] | None = None
        self._closing = False

    def set(self, service: str, status: int) -> None:
        """Set a service's status ("" is the server as a whole); ignored once closing."""
        if not self._closing:
            self._status[service] = status
            self._signal()

    def enter_graceful_shutdown(self) -> None:
        """Everything NOT_SERVING from now on; Watch streams send it, then end."""
        self._closing = True
        for service in self._status:
            self._status[service] = NOT_SERVING
        self._signal()

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last: int | None = None
        while True:
            status = self._status.get(request.service, SERVICE_UNKNOWN)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            if self._closing:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "server shutting down")
            await asyncio.shield(self._next_change())

    def _next_change(self) -> asyncio.Future[None]:
        if self._changed is None or self._changed.done():
            self._changed = asyncio.get_running_loop().create_future()
        return self._changed

    def _signal(self) -> None:
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)
