"""The validator agent: composition root and life cycle.

Start: the store, the chain, with ``--run-challenges`` the local runtime, one channel
to the master, then five tasks: the two streams (``WatchRegistry``, ``WatchWeights``),
the submitter (which first closes what a previous run left unfinished), the reporter and
the expiry watch; with ``--run-challenges`` a sixth, the reconciler that runs the
registry's ACTIVE challenges (:mod:`validator.challenges`), after it adopted what a
previous run left running; then ``/metrics`` and ``/healthz``, then the ready file.

Stop (SIGTERM/SIGINT): the streams and the reconciler first (no new vectors, no new
instances), then the submitter gets ``--shutdown-grace`` to finish a submission in
flight (a wait for the rate limit is left at once, and its epoch goes back to the
queue), the reporter one last delivery round within what is left of the grace; then the
challenges (stopped, or left running with ``--runtime-keep-on-exit``), the channel, the
chain and the store, each given ``CLOSE_TIMEOUT_S`` to close and otherwise left behind
with a warning that names it, so a stop ends in bounded time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from platform_common import callauth
from platform_common.chain import Chain, open_chain
from platform_common.config import join_host_port, parse_host_port
from platform_common.files import write_atomically
from platform_common.keys import Signer
from platform_common.metrics import MetricsServer
from platform_common.runtime import Instance, RuntimeBusy
from platform_common.runtime.images import ImageMapError
from platform_common.runtime.images import load as load_images
from platform_common.runtime.local import LocalRuntime
from platform_common.runtime.reconcile import Reconciler
from platform_network.v1 import registry_pb2_grpc, weights_pb2, weights_pb2_grpc
from validator import telemetry
from validator.challenges import (
    TOKENS_FILE,
    InstanceTokens,
    StreamedRegistry,
    TokenFileError,
    count_states,
    describe,
)
from validator.config import ValidatorConfig
from validator.intake import VectorIntake, WeightsFollower
from validator.reports import Reporter, ReportFactory
from validator.store import Store
from validator.streams import Backoff, RegistryFollower, StreamRunner, open_channel
from validator.submit import SubmitSettings, Submitter
from validator.verify import Expectations

log = logging.getLogger(__name__)

WATCH_WEIGHTS = "/platform_network.v1.Weights/WatchWeights"
WATCH_REGISTRY = "/platform_network.v1.Registry/WatchRegistry"
REPORT_SUBMISSION = "/platform_network.v1.Weights/ReportSubmission"
REPORT_TIMEOUT = 10.0
# With --run-challenges: how often instances are checked besides registry changes.
RECONCILE_POLL = 1.0
_NS = 1_000_000_000
T = TypeVar("T")


class StartupError(Exception):
    """The agent cannot start (store, chain or metrics port unusable)."""


class Agent:
    """One validator agent. ``chain`` and ``clock`` may be given (tests); by default the
    chain is opened from the configuration and the clock is the system's."""

    def __init__(
        self,
        config: ValidatorConfig,
        *,
        signer: Signer | None = None,
        chain: Chain | None = None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        config.check()
        self.config = config
        self.signer = signer if signer is not None else config.signer()
        self._chain = chain
        self._own_chain = chain is None
        self._clock = clock
        self.store: Store | None = None
        self.submitter: Submitter | None = None
        self.intake: VectorIntake | None = None
        self.weights: WeightsFollower | None = None
        self.registry: RegistryFollower | None = None
        self._streams: dict[str, StreamRunner] = {}
        self._reporter: Reporter | None = None
        self._channel: Any = None
        self._status: MetricsServer | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._latest_changed = asyncio.Event()
        self._stopping = False
        self._failed: str | None = None
        self.vector_expired = False
        self.metrics_port = 0
        #: With --run-challenges: the local runtime, its reconciler, the last instances seen.
        self.runtime: LocalRuntime | None = None
        self.challenges: Reconciler | None = None
        self.instances: list[Instance] = []
        self._wanted: StreamedRegistry | None = None

    # -- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        config = self.config
        try:
            self.store = await Store.open(config.database_url)
        except Exception as exc:
            raise StartupError(f"--database-url: cannot open the store: {exc}") from exc
        store = self.store
        try:
            if self._chain is None:
                self._chain = open_chain(config.chain, config.netuid)
        except (ValueError, OSError) as exc:
            await store.close()
            raise StartupError(f"--chain: {exc}") from exc
        if config.run_challenges:
            try:
                await self._open_runtime(store)
            except StartupError:
                await self._close_chain()
                await store.close()
                raise
        await self._assemble(store, self._chain)
        if self.challenges is not None:
            try:
                await self.challenges.start()
            except Exception as exc:
                await self.stop()
                raise StartupError(f"--run-challenges: cannot start the challenges: {exc}") from exc
            self._spawn("challenges", self.challenges.run_forever)
        self._spawn("submitter", self._running(self.submitter).run)
        self._spawn("reporter", self._running(self._reporter).run)
        self._spawn("expiry", self._watch_expiry)
        for name, runner in self._streams.items():
            self._spawn(f"stream.{name}", runner.run)
        await self._serve_status()
        weights, registry = self.weights, self.registry
        log.info(
            "validator agent running",
            extra={
                "hotkey": self.signer.ss58_address,
                "master": config.master,
                "master_hotkey": config.master_hotkey,
                "netuid": config.netuid,
                "mechanism_id": config.mechanism_id,
                "store": store.backend,
                "weights_epoch": weights.cursor.revision if weights and weights.cursor else 0,
                "registry_revision": (
                    registry.cursor.revision if registry and registry.cursor else 0
                ),
                "metrics_port": self.metrics_port or None,
            },
        )
        if config.ready_file and self._status is not None:
            host, _ = parse_host_port(config.metrics_listen, "--metrics-listen")
            write_atomically(
                Path(config.ready_file), join_host_port(host, self.metrics_port) + "\n"
            )

    async def _open_runtime(self, store: Store) -> None:
        """The local runtime on --runtime-dir (locked: one agent per directory) and the
        tokens of its instances; the reconciler follows the streamed registry."""
        config = self.config
        try:
            runtime = LocalRuntime(
                Path(config.runtime_dir), load_images(Path(config.runtime_images))
            )
        except (ImageMapError, RuntimeBusy, OSError) as exc:
            raise StartupError(f"--run-challenges: {exc}") from exc
        try:
            tokens = InstanceTokens(runtime.state_dir / TOKENS_FILE)
        except TokenFileError as exc:
            # Nothing was started yet: releasing the lock is all there is to undo.
            await runtime.close(stop_instances=False)
            raise StartupError(f"--runtime-dir: {exc}") from exc
        self.runtime = runtime
        self._wanted = StreamedRegistry(store, tokens)
        self.challenges = Reconciler(
            self._wanted, runtime, poll=RECONCILE_POLL, observe=self._observe_instances
        )

    def _observe_instances(self, instances: Sequence[Instance]) -> None:
        self.instances = list(instances)
        for state, count in count_states(instances).items():
            telemetry.CHALLENGE_INSTANCES.labels(state).set(count)

    @staticmethod
    def _running(part: T | None) -> T:
        assert part is not None
        return part

    async def _assemble(self, store: Store, chain: Chain) -> None:
        """Build the parts and load the stream positions (the submitter recovers an
        unfinished run when it starts)."""
        config = self.config
        backoff = Backoff(config.reconnect_min, config.reconnect_max)
        reports = ReportFactory(self.signer.ss58_address)
        self._channel = open_channel(config.master)
        weights_stub = weights_pb2_grpc.WeightsStub(self._channel)
        registry_stub = registry_pb2_grpc.RegistryStub(self._channel)

        async def send(report: weights_pb2.SubmissionReport) -> Any:
            request = weights_pb2.ReportSubmissionRequest(report=report)
            return await weights_stub.ReportSubmission(
                request,
                metadata=callauth.sign_call(self.signer, REPORT_SUBMISSION, request),
                timeout=REPORT_TIMEOUT,
            )

        reporter = Reporter(store, send, Backoff(config.reconnect_min, config.report_retry_max))
        self._reporter = reporter
        submitter = Submitter(
            store,
            chain,
            self.signer.keypair,
            reports,
            SubmitSettings(
                mechanism_id=config.mechanism_id,
                attempts=config.submit_attempts,
                retry_delay=config.submit_retry_delay,
                poll_interval=config.chain_poll_interval,
            ),
            on_report=reporter.wake,
            clock=self._clock,
        )
        self.submitter = submitter
        intake = VectorIntake(
            store,
            Expectations(
                master_hotkey=config.master_hotkey,
                netuid=config.netuid,
                mechanism_id=config.mechanism_id,
                clock_skew=config.clock_skew,
            ),
            reports,
            on_queued=submitter.wake,
            on_report=reporter.wake,
            on_latest=self._latest_changed.set,
            clock=self._clock,
        )
        self.intake = intake
        weights = WeightsFollower(store, intake, clock_skew=config.clock_skew, clock=self._clock)
        registry = RegistryFollower(
            store, on_change=self._wanted.changed if self._wanted is not None else None
        )
        self.weights, self.registry = weights, registry
        await weights.load()
        await registry.load()
        for vector in await store.queued():
            intake.note_latest(vector)

        async def connect_weights() -> Any:
            request = weights.request()
            metadata = callauth.sign_call(self.signer, WATCH_WEIGHTS, request)
            return weights_stub.WatchWeights(request, metadata=metadata)

        async def connect_registry() -> Any:
            request = registry.request()
            metadata = callauth.sign_call(self.signer, WATCH_REGISTRY, request)
            return registry_stub.WatchRegistry(request, metadata=metadata)

        self._streams = {
            "weights": StreamRunner("weights", connect_weights, weights.apply, backoff),
            "registry": StreamRunner("registry", connect_registry, registry.apply, backoff),
        }

    async def _serve_status(self) -> None:
        config = self.config
        if config.metrics_listen:
            host, port = parse_host_port(config.metrics_listen, "--metrics-listen")
            try:
                self._status = MetricsServer(host, port, self.health)
            except OSError as exc:
                await self.stop()
                raise StartupError(
                    f"--metrics-listen: cannot listen on {config.metrics_listen}: {exc}"
                ) from exc
            self.metrics_port = self._status.port

    def _spawn(self, name: str, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
        task = asyncio.create_task(run(), name=f"validator.{name}")
        task.add_done_callback(lambda done: self._ended(name, done))
        self._tasks[name] = task

    def _ended(self, name: str, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._stopping:
            return
        error = task.exception()
        self._failed = f"{name}: {error!r}"
        log.error(
            "a part of the agent stopped unexpectedly; the agent is unhealthy",
            extra={"part": name, "error": repr(error)},
            exc_info=error,
        )

    async def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        grace = self.config.shutdown_grace
        log.info("validator agent stopping", extra={"grace_seconds": grace})
        started = time.monotonic()
        deadline = started + grace
        for name in ("stream.weights", "stream.registry", "challenges", "expiry"):
            await _cancel(self._tasks.get(name))
        submitting = self._tasks.get("submitter")
        if self.submitter is not None and submitting is not None:
            in_flight = self.submitter.in_flight
            self.submitter.stop_soon()
            try:
                await asyncio.wait_for(asyncio.shield(submitting), grace)
            except TimeoutError:
                log.warning(
                    "a submission was still in flight when the grace ran out; its epoch will "
                    "be recorded as of unknown outcome at the next start",
                    extra={"epoch": in_flight.epoch if in_flight else None},
                )
            except Exception:
                log.debug("the submitter had already failed", exc_info=True)
            await _cancel(submitting)
        reporting = self._tasks.get("reporter")
        await _cancel(reporting)
        if self._reporter is not None and (remaining := deadline - time.monotonic()) > 0:
            try:
                await asyncio.wait_for(self._reporter.deliver(), remaining)
            except TimeoutError:
                log.warning("the last report delivery ran out of the grace; left undelivered")
            except Exception:
                log.debug("the last report delivery failed", exc_info=True)
        if self._status is not None:
            self._status.stop()
        if self.runtime is not None:
            keep = self.config.runtime_keep_on_exit
            try:
                await self.runtime.close(stop_instances=not keep)
            except Exception:
                log.exception("the local runtime did not close cleanly")
        if self._channel is not None:
            await _bounded_close("the channel to the master", self._channel.close())
        await self._close_chain()
        if self.store is not None:
            await _bounded_close("the store", self.store.close())
        log.info("validator agent stopped", extra={"seconds": round(time.monotonic() - started, 3)})

    async def _close_chain(self) -> None:
        if self._chain is not None and self._own_chain:
            await _bounded_close("the chain client", self._chain.close())

    # -- expiry -----------------------------------------------------------------------

    async def _watch_expiry(self) -> None:
        """Say so (log, gauge) when the newest vector expires with nothing fresher."""
        while True:
            self._latest_changed.clear()
            latest = self.intake.latest if self.intake is not None else None
            if latest is None:
                await self._latest_changed.wait()
                continue
            remaining = (latest.expire_time.ToNanoseconds() - self._clock()) / _NS
            if remaining > 0:
                self._set_expired(False, latest)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._latest_changed.wait(), remaining)
                continue
            self._set_expired(True, latest)
            await self._latest_changed.wait()

    def _set_expired(self, expired: bool, latest: weights_pb2.WeightVector) -> None:
        if expired == self.vector_expired:
            return
        self.vector_expired = expired
        telemetry.VECTOR_EXPIRED.set(1 if expired else 0)
        stream = self._streams.get("weights")
        extra = {
            "epoch": latest.epoch,
            "expire_time": latest.expire_time.ToJsonString(),
            "master_connected": bool(stream and stream.connected),
        }
        if expired:
            log.warning(
                "the newest vector has expired: submitting nothing until the master "
                "publishes a fresh one",
                extra=extra,
            )
        else:
            log.info("a fresh vector is held again", extra=extra)

    # -- health -----------------------------------------------------------------------

    def health(self) -> tuple[bool, dict[str, Any]]:
        """What /healthz answers: healthy while running and no part has died."""
        latest = self.intake.latest if self.intake is not None else None
        submitter = self.submitter
        details: dict[str, Any] = {
            "streams": {name: runner.connected for name, runner in self._streams.items()},
            "latest_epoch": latest.epoch if latest is not None else 0,
            "vector_expired": self.vector_expired,
            "submitted_epoch": submitter.submitted_epoch if submitter else 0,
            "waiting_for_block": submitter.waiting_for_block if submitter else 0,
        }
        if self.runtime is not None:
            details["challenges"] = describe(self.instances)
        if self._failed:
            details["failed"] = self._failed
        if self._stopping:
            details["stopping"] = True
        return (not self._stopping and self._failed is None), details


# How long each resource gets to close on the way out; one that takes longer is left
# behind (the process is exiting) and named in the log, so a stop stays bounded.
CLOSE_TIMEOUT_S = 5.0


async def _bounded_close(what: str, closing: Coroutine[Any, Any, Any]) -> None:
    try:
        await asyncio.wait_for(closing, CLOSE_TIMEOUT_S)
    except TimeoutError:
        log.warning(
            "a resource did not close in time; left behind",
            extra={"resource": what, "timeout_seconds": CLOSE_TIMEOUT_S},
        )
    except Exception:
        log.warning("a resource failed to close", extra={"resource": what}, exc_info=True)


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is None or task.done():
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


async def serve(config: ValidatorConfig, signer: Signer | None = None) -> None:
    """Run the agent until SIGTERM or SIGINT, then stop gracefully."""
    agent = Agent(config, signer=signer)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await agent.start()
    try:
        await stop.wait()
    finally:
        await agent.stop()
