"""The shim process: composition root and life cycle.

Start: the transport to the challenge, the gRPC server the master calls
(ChallengeInternal behind the challenge token, health, reflection), the broker
door, the metrics endpoint, then the ready file. Stop on SIGTERM/SIGINT: health
NOT_SERVING and new calls refused with UNAVAILABLE, in-flight calls drained for
the grace period, then the broker door and the transport.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from pathlib import Path

from challenge_shim.auth import ChallengeToken
from challenge_shim.broker_door import BrokerDoor
from challenge_shim.config import ShimConfig
from challenge_shim.http_compat import HttpUpstream
from challenge_shim.service import ShimService
from challenge_shim.upstream import GrpcUpstream, Upstream
from platform_common import metrics, rpc
from platform_common.config import join_host_port, parse_host_port
from platform_common.files import write_atomically
from platform_network.v1 import challenge_pb2, challenge_pb2_grpc

log = logging.getLogger(__name__)

SERVICE = challenge_pb2.DESCRIPTOR.services_by_name["ChallengeInternal"]


class StartupError(Exception):
    """The shim cannot start (a port is taken)."""


class Shim:
    """One shim: the master-facing server, the broker door and the metrics endpoint."""

    def __init__(self, config: ShimConfig) -> None:
        config.check()
        self.config = config
        self._token = config.token_value()
        self._upstream: Upstream | None = None
        self._service: ShimService | None = None
        self._server: rpc.Server | None = None
        self._door: BrokerDoor | None = None
        self._metrics: metrics.MetricsServer | None = None
        self.address = ""
        self.broker_address = ""

    async def start(self) -> None:
        config = self.config
        if config.transport == "http":
            self._upstream = HttpUpstream(config.challenge_address, config.slug, config.limits)
        else:
            self._upstream = GrpcUpstream(config.challenge_address, config.limits)
        service = ShimService(
            self._upstream,
            slug=config.slug,
            limits=config.limits,
            max_deadline=config.max_deadline,
            health_timeout=config.health_timeout,
        )
        self._service = service
        guard = rpc.CallGuard(
            rpc.method_policies([SERVICE]),
            {rpc.AuthPolicy.AUTH_POLICY_MASTER: ChallengeToken(self._token, config.slug)},
        )
        server = rpc.Server(interceptors=[guard], max_concurrent_rpcs=config.max_concurrent_rpcs)
        server.add_service(
            SERVICE,
            lambda s: challenge_pb2_grpc.add_ChallengeInternalServicer_to_server(service, s),
        )

        async def drain() -> None:
            service.drain()

        server.on_shutdown(drain)
        host, port = parse_host_port(config.listen, "--listen")
        try:
            bound = await server.start(host, port)
        except (OSError, RuntimeError) as exc:
            await self._upstream.close()
            raise StartupError(f"--listen: {exc}") from exc
        self._server = server
        self.address = join_host_port(host, bound)

        if config.master_address:
            door = BrokerDoor(config.master_address, self._token, config.slug)
            b_host, b_port = parse_host_port(config.broker_listen, "--broker-listen")
            try:
                self.broker_address = join_host_port(b_host, await door.start(b_host, b_port))
            except (OSError, RuntimeError) as exc:
                await self.stop()
                raise StartupError(
                    f"--broker-listen: cannot listen on {config.broker_listen}: {exc}"
                ) from exc
            self._door = door
        if config.metrics_listen:
            m_host, m_port = parse_host_port(config.metrics_listen, "--metrics-listen")
            try:
                self._metrics = metrics.MetricsServer(m_host, m_port)
            except OSError as exc:
                await self.stop()
                raise StartupError(
                    f"--metrics-listen: cannot listen on {config.metrics_listen}: {exc}"
                ) from exc

        log.info(
            "shim serving",
            extra={
                "address": self.address,
                "slug": config.slug,
                "transport": config.transport,
                "challenge": config.challenge_address,
                "broker_door": self.broker_address or None,
                "metrics_port": self._metrics.port if self._metrics else None,
                "max_deadline": config.max_deadline,
                "max_entries": config.max_entries,
                "max_response_bytes": config.max_response_bytes,
            },
        )
        if config.ready_file:
            ready = {
                "listen": self.address,
                "broker": self.broker_address or None,
                "metrics": self._metrics.port if self._metrics else None,
            }
            write_atomically(Path(config.ready_file), json.dumps(ready) + "\n")

    async def stop(self) -> None:
        log.info("shim shutting down", extra={"grace_seconds": self.config.shutdown_grace})
        if self._server is not None:
            await self._server.stop(self.config.shutdown_grace)
        if self._door is not None:
            await self._door.stop(1.0)
        if self._upstream is not None:
            await self._upstream.close()
        if self._metrics is not None:
            self._metrics.stop()
        log.info("shim stopped")


async def serve(config: ShimConfig) -> None:
    """Run the shim until SIGTERM or SIGINT, then shut down gracefully."""
    shim = Shim(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await shim.start()
    try:
        await stop.wait()
    finally:
        await shim.stop()
