"""The master process: composition root and life cycle.

Start order: database (migrated), registry store, registry feed, gRPC server
(Registry, Weights, Broker, health, reflection), metrics endpoint, compaction.
Stop order on SIGTERM/SIGINT: health NOT_SERVING, watch streams ended with
UNAVAILABLE (clients resume from their revision), grace period for in-flight
calls, then the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from master.config import MasterConfig
from master.db import migrate
from master.db.engine import create_engine
from master.registry.feed import RegistryFeed
from master.registry.rules import Policy
from master.registry.service import RegistryService
from master.registry.store import RegistryStore
from platform_common import metrics, rpc
from platform_common.config import join_host_port, parse_host_port
from platform_network.v1 import (
    broker_pb2,
    broker_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    weights_pb2,
    weights_pb2_grpc,
)

log = logging.getLogger(__name__)

SERVICES = (
    registry_pb2.DESCRIPTOR.services_by_name["Registry"],
    weights_pb2.DESCRIPTOR.services_by_name["Weights"],
    broker_pb2.DESCRIPTOR.services_by_name["Broker"],
)


class StartupError(Exception):
    """The master cannot start (database unreachable, schema not migrated, port taken)."""


class Master:
    def __init__(self, config: MasterConfig) -> None:
        config.check()
        self.config = config
        self._admin = rpc.AdminToken(config.admin_token_value())
        self._engine: AsyncEngine | None = None
        self._server: rpc.Server | None = None
        self._feed: RegistryFeed | None = None
        self._metrics: metrics.MetricsServer | None = None
        self._compactor: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> None:
        config = self.config
        self._engine = create_engine(config.database_url)
        try:
            if config.migrate:
                await migrate.upgrade(self._engine)
            else:
                await self._require_migrated(self._engine)
        except (OSError, SQLAlchemyError) as exc:
            await self._engine.dispose()
            raise StartupError(f"cannot use the database: {exc}") from exc
        policy = Policy(
            production=config.production,
            image_allowlist=config.image_allowlist,
            metadata_keys=frozenset(config.metadata_keys),
        )
        store = RegistryStore(self._engine, policy)
        self._feed = RegistryFeed(store, poll_interval=config.feed_poll_interval)
        await self._feed.start()

        guard = rpc.CallGuard(
            rpc.method_policies(SERVICES),
            {rpc.AuthPolicy.AUTH_POLICY_ADMIN: self._admin},
        )
        server = rpc.Server(
            interceptors=[guard],
            max_concurrent_rpcs=config.max_concurrent_rpcs,
            # gRPC core queues calls the event loop has not picked up yet and, past
            # 1,000 by default, cancels new ones: every validator reconnecting at
            # once after a restart would see CANCELLED. Queue as many as we serve.
            options=(
                ("grpc.server.max_pending_requests", config.max_concurrent_rpcs),
                ("grpc.server.max_pending_requests_hard_limit", config.max_concurrent_rpcs),
            ),
        )
        registry = RegistryService(store, self._feed, bookmark_interval=config.bookmark_interval)
        server.add_service(
            SERVICES[0], lambda s: registry_pb2_grpc.add_RegistryServicer_to_server(registry, s)
        )
        weights = rpc.not_served_yet(weights_pb2_grpc.WeightsServicer, SERVICES[1])
        server.add_service(
            SERVICES[1],
            lambda s: weights_pb2_grpc.add_WeightsServicer_to_server(weights, s),
            served=False,
        )
        broker = rpc.not_served_yet(broker_pb2_grpc.BrokerServicer, SERVICES[2])
        server.add_service(
            SERVICES[2],
            lambda s: broker_pb2_grpc.add_BrokerServicer_to_server(broker, s),
            served=False,
        )
        server.on_shutdown(self._feed.close)
        host, port = parse_host_port(config.listen, "--listen")
        try:
            self.port = await server.start(host, port)
        except (OSError, RuntimeError) as exc:
            await self._feed.close()
            await self._engine.dispose()
            raise StartupError(f"--listen: cannot listen on {config.listen}: {exc}") from exc
        self._server = server

        if config.metrics_listen:
            m_host, m_port = parse_host_port(config.metrics_listen, "--metrics-listen")
            self._metrics = metrics.MetricsServer(m_host, m_port)
        self._compactor = asyncio.create_task(self._compact_forever(store), name="compactor")

        address = join_host_port(host, self.port)
        log.info(
            "master serving",
            extra={
                "address": address,
                "revision": self._feed.revision,
                "server_epoch": self._feed.server_epoch,
                "metrics_port": self._metrics.port if self._metrics else None,
                "database": self._engine.dialect.name,
                "production": config.production,
            },
        )
        if config.ready_file:
            _write_atomically(Path(config.ready_file), address)

    async def stop(self) -> None:
        log.info("master shutting down", extra={"grace_seconds": self.config.shutdown_grace})
        if self._compactor is not None:
            self._compactor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._compactor
        if self._server is not None:
            await self._server.stop(self.config.shutdown_grace)
        if self._metrics is not None:
            self._metrics.stop()
        if self._engine is not None:
            await self._engine.dispose()
        log.info("master stopped")

    async def _compact_forever(self, store: RegistryStore) -> None:
        while True:
            try:
                compacted = await store.compact(self.config.event_retention)
                log.debug("registry events compacted", extra={"compacted_revision": compacted})
            except Exception:
                log.exception("registry event compaction failed; will retry")
            await asyncio.sleep(self.config.compaction_interval)

    @staticmethod
    async def _require_migrated(engine: AsyncEngine) -> None:
        current = await migrate.current_revision(engine)
        head = migrate.head_revision()
        if current != head:
            raise StartupError(
                f"database schema is at {current or 'nothing'}, this master needs {head}; "
                "run `platform db upgrade` or start with --migrate"
            )


async def serve(config: MasterConfig) -> None:
    """Run the master until SIGTERM or SIGINT, then shut down gracefully."""
    master = Master(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await master.start()
    try:
        await stop.wait()
    finally:
        await master.stop()
    # A StartupError from start() propagates to the caller with nothing left running.


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(text + "\n")
    tmp.replace(path)
