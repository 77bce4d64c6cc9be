"""The master process: composition root and life cycle.

Start order: database (migrated), registry store, registry feed, gRPC server
(Registry, Weights, Broker, health, reflection; with --edge-listen also Envoy's
xDS and ext_authz), metrics endpoint, compaction, epochs, then the edge's first
configuration and the local Envoy (--edge-envoy).
Stop order on SIGTERM/SIGINT: the local Envoy, health NOT_SERVING, watch
streams ended with UNAVAILABLE (clients resume from their revision), grace
period for in-flight calls, then the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from master.config import MasterConfig
from master.db import migrate
from master.db.engine import create_engine
from master.edge.authz import AuthzService
from master.edge.controller import EdgeController
from master.edge.hotkeys import RegisteredHotkeys
from master.edge.model import EdgeLimits, EdgeSettings
from master.edge.nonces import NonceStore
from master.edge.proxy import EnvoyProcess, render_bootstrap
from master.edge.xds import XdsServer
from master.orchestrator import Orchestrator, RuntimePlacement
from master.registry.feed import RegistryFeed
from master.registry.rules import Policy
from master.registry.service import RegistryService
from master.registry.store import RegistryStore
from master.registry.tokens import TokenIssuer
from master.validators import ValidatorCalls
from master.weights import service as weights_service
from master.weights.collector import Collector
from master.weights.endpoints import NoShims, ShimEndpointsFile
from master.weights.epochs import EpochEngine, EpochSettings
from master.weights.feed import WeightsFeed
from master.weights.store import WeightsStore
from platform_common import metrics, rpc, tokens
from platform_common import weights as weight_math
from platform_common.chain import Chain, open_chain
from platform_common.config import ConfigError, env_name, join_host_port, parse_host_port
from platform_common.files import write_atomically
from platform_common.keys import KeyLoadError, Signer, load_hotkey
from platform_common.runtime import RuntimeBusy
from platform_common.runtime.images import ImageMapError
from platform_common.runtime.images import load as load_images
from platform_common.runtime.local import LocalRuntime
from platform_network.v1 import (
    broker_pb2,
    broker_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    weights_pb2,
)

log = logging.getLogger(__name__)

CHALLENGE_HEADER = "x-platform-challenge"

SERVICES = (
    registry_pb2.DESCRIPTOR.services_by_name["Registry"],
    weights_pb2.DESCRIPTOR.services_by_name["Weights"],
    broker_pb2.DESCRIPTOR.services_by_name["Broker"],
)

# Envoy's services (not ours, so no (auth) option): the edge token only.
EDGE_METHODS = {
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources": (
        rpc.AuthPolicy.AUTH_POLICY_EDGE
    ),
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources": (
        rpc.AuthPolicy.AUTH_POLICY_EDGE
    ),
    "/envoy.service.auth.v3.Authorization/Check": rpc.AuthPolicy.AUTH_POLICY_EDGE,
}


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
        self._epoch_task: asyncio.Task[None] | None = None
        self._chain: Chain | None = None
        self._collector: Collector | None = None
        self._weights_feed: WeightsFeed | None = None
        self._token_key = config.token_key()
        self._edge_token = config.edge_token_value() if config.edge_listen else None
        if config.edge_listen and self._edge_token is None:
            # Only with --edge-envoy (config.check refuses it otherwise): the master
            # hands the token to the Envoy it starts itself.
            self._edge_token = secrets.token_urlsafe(32)
        self._xds: XdsServer | None = None
        self._authz: AuthzService | None = None
        self._nonces: NonceStore | None = None
        self._hotkeys: RegisteredHotkeys | None = None
        self._edge_task: asyncio.Task[None] | None = None
        self._prune_task: asyncio.Task[None] | None = None
        self._runtime: LocalRuntime | None = None
        self._orchestrator_task: asyncio.Task[None] | None = None
        #: Keeps the runtime in line with the registry; None with --runtime none.
        self.orchestrator: Orchestrator | None = None
        #: The edge's configuration loop; None without --edge-listen.
        self.edge: EdgeController | None = None
        #: The local Envoy started with --edge-envoy.
        self.envoy: EnvoyProcess | None = None
        self._signer: Signer | None = None
        if config.chain:
            try:
                self._signer = load_hotkey(
                    config.hotkey, config.hotkey_file, env=env_name("hotkey")
                )
            except KeyLoadError as exc:
                raise ConfigError(f"the master's hotkey: {exc}") from exc
        #: The epochs engine; None when no chain is configured.
        self.epochs: EpochEngine | None = None
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
        if self._token_key is None:
            log.warning(
                "no --token-key-file: challenge tokens issued now stop working when this "
                "process exits (fine for a demo, not for a deployment)"
            )
        issuer = TokenIssuer(self._token_key or secrets.token_bytes(32))
        store = RegistryStore(self._engine, policy, issuer)
        self._feed = RegistryFeed(store, poll_interval=config.feed_poll_interval)
        await self._feed.start()
        if config.runtime == "local":
            await self._open_runtime()
        weights_store = WeightsStore(self._engine)
        self._weights_feed = WeightsFeed(weights_store)
        await self._weights_feed.load()
        await self._open_chain()
        server = self._build_server(store, weights_store)
        host, port = parse_host_port(config.listen, "--listen")
        try:
            self.port = await server.start(host, port)
        except (OSError, RuntimeError) as exc:
            await self._feed.close()
            await self._engine.dispose()
            raise StartupError(f"--listen: {exc}") from exc
        self._server = server
        # Epochs other replicas seal; stopped with the server (close_weights_feed).
        self._weights_feed.follow(config.feed_poll_interval)

        if config.metrics_listen:
            m_host, m_port = parse_host_port(config.metrics_listen, "--metrics-listen")
            self._metrics = metrics.MetricsServer(m_host, m_port)
        self._compactor = asyncio.create_task(
            self._compact_forever(store, weights_store), name="compactor"
        )
        await self._start_components(store, weights_store, host)
        if self._nonces is not None:
            self._prune_task = asyncio.create_task(self._nonces.prune_forever(), name="nonces")

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
                "edge": config.edge_listen or None,
            },
        )
        if config.ready_file:
            write_atomically(Path(config.ready_file), address + "\n")

    def _build_server(self, store: RegistryStore, weights_store: WeightsStore) -> rpc.Server:
        config = self.config
        assert self._feed is not None
        assert self._weights_feed is not None
        authenticators: dict[int, rpc.Authenticator] = {
            rpc.AuthPolicy.AUTH_POLICY_ADMIN: self._admin,
            rpc.AuthPolicy.AUTH_POLICY_CHALLENGE: ChallengeTokens(store),
        }
        if self._edge_token is not None:
            authenticators[rpc.AuthPolicy.AUTH_POLICY_EDGE] = rpc.AdminToken(
                self._edge_token, "edge"
            )
        if self._chain is not None:
            assert self._hotkeys is not None
            assert self._nonces is not None
            authenticators[rpc.AuthPolicy.AUTH_POLICY_VALIDATOR] = ValidatorCalls(
                self._hotkeys, self._nonces
            )
        guard = rpc.CallGuard({**rpc.method_policies(SERVICES), **EDGE_METHODS}, authenticators)
        server = rpc.Server(
            interceptors=[guard],
            max_concurrent_rpcs=config.max_concurrent_rpcs,
            reuse_port=config.reuse_port,
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
        weights = weights_service.WeightsService(
            weights_store,
            self._weights_feed,
            self._feed,
            bookmark_interval=config.bookmark_interval,
        )
        server.add_service(SERVICES[1], lambda s: weights_service.add_to_server(weights, s))
        broker = rpc.not_served_yet(broker_pb2_grpc.BrokerServicer, SERVICES[2])
        server.add_service(
            SERVICES[2],
            lambda s: broker_pb2_grpc.add_BrokerServicer_to_server(broker, s),
            served=False,
        )
        if self._xds is not None and self._authz is not None:
            from envoy.service.auth.v3 import external_auth_pb2
            from envoy.service.discovery.v3 import ads_pb2

            server.add_service(
                ads_pb2.DESCRIPTOR.services_by_name["AggregatedDiscoveryService"],
                self._xds.add_to_server,
            )
            server.add_service(
                external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"],
                self._authz.add_to_server,
            )
            xds = self._xds

            async def close_xds() -> None:
                await xds.close()

            server.on_shutdown(close_xds)
        server.on_shutdown(self._feed.close)
        weights_feed = self._weights_feed

        async def close_weights_feed() -> None:
            await weights_feed.close()

        server.on_shutdown(close_weights_feed)
        return server

    async def _start_epochs(self, store: RegistryStore, weights_store: WeightsStore) -> None:
        config = self.config
        assert self._feed is not None
        assert self._weights_feed is not None
        assert self._signer is not None
        assert self._chain is not None
        shims = self._placement()
        self._collector = Collector(timeout=config.collect_timeout)
        self.epochs = EpochEngine(
            EpochSettings(
                netuid=config.netuid,
                mechanism_id=config.mechanism_id,
                burn_uid=config.burn_uid,
                policy=weight_math.Policy(config.share_policy),
                schedule=config.epoch_schedule,
                interval=config.epoch_interval,
                lead_blocks=config.epoch_lead_blocks,
                block_time=config.block_time,
                vector_lifetime=config.vector_lifetime,
            ),
            registry=self._feed,
            registry_store=store,
            shims=shims,
            collector=self._collector,
            chain=self._chain,
            signer=self._signer,
            store=weights_store,
            feed=self._weights_feed,
        )
        if config.epochs:
            self._epoch_task = asyncio.create_task(self.epochs.run_forever(), name="epochs")
        log.info(
            "epochs enabled",
            extra={
                "chain": config.chain,
                "netuid": config.netuid,
                "schedule": config.epoch_schedule if config.epochs else "manual",
                "master_hotkey": self._signer.ss58_address,
                "policy": config.share_policy,
            },
        )

    async def _start_components(
        self, store: RegistryStore, weights_store: WeightsStore, host: str
    ) -> None:
        """The runtime first (epochs and the edge ask it where challenges are), then the
        epochs engine and the edge."""
        config = self.config
        if self._runtime is not None:
            await self._start_orchestrator(store, host)
        if config.chain:
            await self._start_epochs(store, weights_store)
        if config.edge_listen:
            await self._start_edge(host)

    async def _open_runtime(self) -> None:
        """The local runtime: its image map read and its state directory locked before
        the master serves, so a bad map or a second master on the directory stops here."""
        config = self.config
        assert self._feed is not None
        assert self._engine is not None
        try:
            self._runtime = LocalRuntime(
                Path(config.runtime_dir), load_images(Path(config.runtime_images))
            )
        except (ImageMapError, RuntimeBusy, OSError) as exc:
            await self._feed.close()
            await self._engine.dispose()
            raise StartupError(f"--runtime local: {exc}") from exc

    async def _start_orchestrator(self, store: RegistryStore, host: str) -> None:
        """Adopt what a previous master left running, then follow the registry."""
        config = self.config
        assert self._feed is not None
        assert self._runtime is not None
        # Each shim's broker door forwards the challenge's Broker calls to this master.
        self._runtime.master_address = join_host_port(_reachable(host), self.port)
        self.orchestrator = Orchestrator(
            self._feed, self._runtime, store.tokens_of, poll=config.feed_poll_interval
        )
        await self.orchestrator.start()
        self._orchestrator_task = asyncio.create_task(
            self.orchestrator.run_forever(), name="orchestrator"
        )
        log.info(
            "runtime started",
            extra={
                "runtime": config.runtime,
                "state_dir": str(self._runtime.state_dir),
                "images": config.runtime_images,
                "keep_on_exit": config.runtime_keep_on_exit,
            },
        )

    def _placement(self) -> RuntimePlacement | ShimEndpointsFile | NoShims:
        """Where challenges' shims and public APIs listen: the runtime's instances, the
        static --shim-endpoints-file, or nowhere."""
        if self.orchestrator is not None:
            return self.orchestrator.placement
        if self.config.shim_endpoints_file:
            return ShimEndpointsFile(Path(self.config.shim_endpoints_file))
        return NoShims()

    async def _open_chain(self) -> None:
        """The chain, and what checks signed calls and requests against it, before the
        server is built (its authenticators and the edge's services need them)."""
        config = self.config
        assert self._feed is not None
        assert self._engine is not None
        if config.chain:
            try:
                self._chain = open_chain(config.chain, config.netuid)
            except ValueError as exc:
                await self._feed.close()
                await self._engine.dispose()
                raise StartupError(f"--chain: {exc}") from exc
        if config.chain or config.edge_listen:
            # Signed calls (validators) and signed requests (miners) share the
            # metagraph cache and the replay store.
            self._nonces = NonceStore(self._engine)
            self._hotkeys = RegisteredHotkeys(self._chain or _NoChain())
        if config.edge_listen:
            self._prepare_edge()

    def _prepare_edge(self) -> None:
        """The edge's gRPC services, registered before the server starts."""
        config = self.config
        assert self._nonces is not None
        assert self._hotkeys is not None
        self._xds = XdsServer()
        self._authz = AuthzService(
            self._nonces,
            self._hotkeys,
            receiver_ss58=self._signer.ss58_address if self._signer is not None else None,
            max_age=config.edge_signature_max_age,
        )

    async def _start_edge(self, host: str) -> None:
        """First configuration, the loop that follows the registry, the local Envoy."""
        config = self.config
        assert self._feed is not None
        assert self._xds is not None
        assert self._edge_token
        listen_host, listen_port = parse_host_port(config.edge_listen, "--edge-listen")
        reachable = _reachable(host)
        if config.edge_authz_address:
            authz_host, authz_port = parse_host_port(
                config.edge_authz_address, "--edge-authz-address"
            )
        else:
            authz_host, authz_port = reachable, self.port
        placement = self._placement()
        self.edge = EdgeController(
            self._feed,
            placement,
            self._xds,
            EdgeSettings(
                listen_host=listen_host,
                listen_port=listen_port,
                authz_host=authz_host,
                authz_port=authz_port,
                edge_token=self._edge_token,
                access_log=config.edge_access_log,
                trusted_proxies=config.edge_trusted_proxies,
                authz_rate_per_ip_per_minute=config.edge_authz_rate_per_ip,
                tls_cert_file=config.edge_tls_cert,
                tls_key_file=config.edge_tls_key,
            ),
            EdgeLimits(
                rate_per_hotkey_per_minute=config.edge_rate_per_hotkey,
                rate_per_ip_per_minute=config.edge_rate_per_ip,
                max_request_body_bytes=config.edge_max_body_bytes,
                request_timeout_seconds=config.edge_timeout,
            ),
        )
        await self.edge.start()
        self._edge_task = asyncio.create_task(self.edge.run_forever(), name="edge")
        if config.edge_envoy:
            await self._start_envoy(reachable)

    async def _start_envoy(self, xds_host: str) -> None:
        config = self.config
        assert self._edge_token is not None
        admin_host, admin_port = parse_host_port(config.edge_admin_listen, "--edge-admin-listen")
        bootstrap = render_bootstrap(
            node_id=f"platform-master-{os.getpid()}",
            admin_host=admin_host,
            admin_port=admin_port,
            xds_host=xds_host,
            xds_port=self.port,
            edge_token=self._edge_token,
            max_connections=config.edge_max_connections,
            max_heap_bytes=config.edge_max_heap_bytes,
        )
        envoy = EnvoyProcess(
            bootstrap,
            work_dir=Path(config.edge_envoy_dir) if config.edge_envoy_dir else None,
            log_level="warning" if config.log_level != "debug" else "info",
        )
        try:
            await envoy.start()
            await envoy.wait_ready(timeout=30.0)
        except Exception as exc:
            await envoy.stop()
            raise StartupError(f"--edge-envoy: Envoy did not start: {exc}") from exc
        self.envoy = envoy
        log.info(
            "edge serving",
            extra={"edge": config.edge_listen, "envoy_pid": envoy.pid, "admin": envoy.admin},
        )

    async def stop(self) -> None:
        log.info("master shutting down", extra={"grace_seconds": self.config.shutdown_grace})
        if self.envoy is not None:
            await self.envoy.stop()
        for task in (
            self._compactor,
            self._epoch_task,
            self._edge_task,
            self._prune_task,
            self._orchestrator_task,
        ):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._runtime is not None:
            # Challenges stop with the master unless asked to outlive it (then the next
            # master adopts them).
            await self._runtime.close(stop_instances=not self.config.runtime_keep_on_exit)
        if self._server is not None:
            await self._server.stop(self.config.shutdown_grace)
        if self._metrics is not None:
            self._metrics.stop()
        if self._collector is not None:
            await self._collector.close()
        if self._hotkeys is not None:
            await self._hotkeys.close()
        if self._nonces is not None:
            await self._nonces.close()
        if self._chain is not None:
            await self._chain.close()
        if self._engine is not None:
            await self._engine.dispose()
        log.info("master stopped")

    async def _compact_forever(self, store: RegistryStore, weights: WeightsStore) -> None:
        while True:
            try:
                compacted = await store.compact(self.config.event_retention)
                log.debug("registry events compacted", extra={"compacted_revision": compacted})
                retention = self.config.epoch_retention
                if retention and await weights.prune(retention) and self._weights_feed:
                    self._weights_feed.pruned(await weights.oldest_epoch())
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


class _NoChain:
    """Stands for the chain when none is configured: signed routes answer 503."""

    async def metagraph(self, block: int | None = None) -> Any:
        raise ConnectionError("no chain configured (--chain): cannot check miners' hotkeys")


def _reachable(host: str) -> str:
    """An address a local client can dial for a listen host (wildcards -> loopback)."""
    wildcards = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104
    return wildcards.get(host, host)


class ChallengeTokens:
    """AUTH_POLICY_CHALLENGE: a challenge's shim calling with its token.

    The shim sends ``authorization: Bearer <challenge token>`` and
    ``x-platform-challenge: <slug>``; the token is checked against the stored
    digest of that challenge.
    """

    def __init__(self, store: RegistryStore) -> None:
        self._store = store

    async def __call__(self, method: str, metadata: rpc.Metadata) -> rpc.Caller:
        presented = tokens.bearer(metadata)
        slug = next((str(v) for k, v in metadata if k == CHALLENGE_HEADER), "")
        if presented is None or not slug:
            raise rpc.Unauthenticated(
                "missing credentials: send 'authorization: Bearer <challenge token>' and "
                f"'{CHALLENGE_HEADER}: <slug>'",
                reason="missing",
            )
        if not await self._store.token_matches(slug, presented):
            raise rpc.Unauthenticated(
                f"invalid challenge token for {slug!r}", reason="invalid_token"
            )
        return rpc.Caller("challenge", slug)
