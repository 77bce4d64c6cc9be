"""The epochs engine: collect, allocate, convert, seal, persist, publish.

One epoch, start to end (``EpochEngine.run_epoch``):

1. the registry's ACTIVE challenges at the feed's revision, the chain's block,
   metagraph and hyperparameters at that block;
2. every challenge collected concurrently through its shim, each within the
   collection deadline (see :mod:`master.weights.collector`);
3. the float vector by the subnet's semantics (:mod:`platform_common.weights`),
   its u16 form by the Bittensor SDK's own conversion (``Chain.plan_weights``);
4. the vector signed over its canonical encoding (:mod:`platform_common.vectors`),
   persisted with its inputs, then published to readers and watchers.

A vector is sealed only when every step succeeds; otherwise the epoch is not
sealed, the reason is logged and counted, and the previous vector stays the
latest until it expires.

On the tempo schedule, master replicas sharing a database run each tempo's epoch
once: the replica that claims the tempo first (``WeightsStore.claim_tempo``) runs
it, and gives it back if it cannot seal, so that another replica may.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from master.registry.feed import RegistryFeed
from master.registry.rules import Status
from master.registry.store import RegistryStore
from master.weights import telemetry
from master.weights.collector import Collected, Collector, Target
from master.weights.endpoints import ShimDirectory
from master.weights.feed import WeightsFeed
from master.weights.store import EpochTaken, WeightsStore
from platform_common import vectors
from platform_common import weights as math_
from platform_common.chain import Chain, Hyperparameters
from platform_common.keys import Signer
from platform_common.protos import duration
from platform_network.v1 import challenge_pb2, weights_pb2

log = logging.getLogger(__name__)
T = TypeVar("T")

Status_ = weights_pb2.ChallengeEpochStatus
_STATUS = {
    math_.Outcome.OK: Status_.CHALLENGE_EPOCH_STATUS_OK,
    math_.Outcome.FAILED: Status_.CHALLENGE_EPOCH_STATUS_FAILED,
    math_.Outcome.EMPTY: Status_.CHALLENGE_EPOCH_STATUS_EMPTY,
}
_FAILED = Status_.CHALLENGE_EPOCH_STATUS_FAILED
_POLICY = {
    math_.Policy.BURN: weights_pb2.SHARE_POLICY_BURN,
    math_.Policy.REDISTRIBUTE: weights_pb2.SHARE_POLICY_REDISTRIBUTE,
}


class EpochNotSealed(Exception):
    """The epoch could not be sealed; ``outcome`` labels the metric."""

    def __init__(self, outcome: str, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome


@dataclass(frozen=True)
class EpochSettings:
    netuid: int
    mechanism_id: int
    burn_uid: int
    policy: math_.Policy
    schedule: str  # "interval" | "tempo"
    interval: float
    lead_blocks: int
    block_time: float
    vector_lifetime: float  # 0: two epoch periods
    chain_timeout: float = 30.0


class EpochEngine:
    def __init__(
        self,
        settings: EpochSettings,
        *,
        registry: RegistryFeed,
        registry_store: RegistryStore,
        shims: ShimDirectory,
        collector: Collector,
        chain: Chain,
        signer: Signer,
        store: WeightsStore,
        feed: WeightsFeed,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.settings = settings
        self._registry = registry
        self._registry_store = registry_store
        self._shims = shims
        self._collector = collector
        self._chain = chain
        self._signer = signer
        self._store = store
        self._feed = feed
        self._clock = clock
        self._lock = asyncio.Lock()
        #: Seconds spent by the last sealed epoch: "collect" (health checks and
        #: answers), "seal" (everything after: allocation, conversion, signature,
        #: persistence, publication) and "total".
        self.last_timings: dict[str, float] = {}
        #: This engine's name in the tempo claims other replicas see.
        self.holder = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:12]}"[-128:]

    # -- scheduling -------------------------------------------------------------------

    async def run_forever(self) -> None:
        """Seal epochs on the configured schedule until cancelled."""
        if self.settings.schedule == "interval":
            await self._every_interval()
        else:
            await self._every_tempo()

    async def _every_interval(self) -> None:
        interval = self.settings.interval
        next_at = time.monotonic()
        while True:
            await self._run_logged()
            next_at += interval
            now = time.monotonic()
            if now > next_at:  # overran: skip the slots that passed, never run twice at once
                skipped = math.floor((now - next_at) / interval) + 1
                log.warning("epoch slots skipped", extra={"skipped": skipped})
                next_at += skipped * interval
            await asyncio.sleep(next_at - now)

    async def _every_tempo(self) -> None:
        settings = self.settings
        last_slot: int | None = None
        yielded_slot: int | None = None
        while True:
            try:
                block = await self._chain_call(self._chain.current_block())
                hyper = await self._chain_call(self._chain.hyperparameters(block))
            except EpochNotSealed as exc:
                log.warning("chain unavailable for scheduling", extra={"error": str(exc)})
                await asyncio.sleep(settings.block_time)
                continue
            slot, remaining = tempo_position(block, settings.netuid, hyper.tempo)
            if remaining <= settings.lead_blocks and slot != last_slot:
                end_block = block + remaining
                claimed = await self._claim_tempo(end_block)
                if claimed:
                    # Sealed on the metagraph at the block that chose this slot: a block
                    # later the chain may already be in the next tempo.
                    sealed = False
                    try:
                        sealed = await self._run_logged(block)
                    finally:
                        # Also when this replica stops mid-run (cancelled): a claim is
                        # never given up otherwise, and no other replica would run it.
                        if not sealed:
                            await self._release_tempo(end_block)
                    last_slot = slot
                    wait_blocks = remaining + 1
                else:
                    if claimed is False and yielded_slot != slot:
                        yielded_slot = slot
                        telemetry.EPOCHS.labels("taken").inc()
                        log.info(
                            "epoch left to another replica",
                            extra={"tempo_end_block": end_block},
                        )
                    # Looked at again every block: the holder gives the tempo back if it
                    # cannot seal (and a claim the database refused is tried again).
                    wait_blocks = 1
            else:
                wait_blocks = max(remaining - settings.lead_blocks, 1)
            # Re-check at least every minute: block times drift.
            await asyncio.sleep(min(wait_blocks * settings.block_time, 60.0))

    async def _claim_tempo(self, end_block: int) -> bool | None:
        """Whether this replica runs the epoch of the tempo ending at ``end_block``: the
        first replica to claim it in the database does; the others leave it to it. None
        when the database could not be asked."""
        try:
            return await self._store.claim_tempo(end_block, self.holder)
        except Exception:
            log.exception("cannot claim the tempo's epoch", extra={"tempo_end_block": end_block})
            return None

    async def _release_tempo(self, end_block: int) -> None:
        try:
            await self._store.release_tempo(end_block, self.holder)
        except Exception:
            log.exception(
                "cannot give the tempo back; no other replica will run its epoch",
                extra={"tempo_end_block": end_block},
            )

    async def _run_logged(self, block: int | None = None) -> bool:
        """Run one epoch; whether one is sealed for it (by this replica, or, "taken", by
        another)."""
        try:
            await self.run_epoch(block)
        except EpochNotSealed as exc:
            # "taken": another replica sealed it, which is how replicas share the schedule.
            level = logging.INFO if exc.outcome == "taken" else logging.ERROR
            log.log(level, "epoch not sealed", extra={"outcome": exc.outcome, "error": str(exc)})
            return exc.outcome == "taken"
        except asyncio.CancelledError:
            raise
        except Exception:
            telemetry.EPOCHS.labels("error").inc()
            log.exception("epoch failed")
            return False
        return True

    def period(self, hyper: Hyperparameters | None) -> float:
        """Seconds between two epochs on this schedule."""
        if self.settings.schedule == "interval" or hyper is None:
            return self.settings.interval
        return (hyper.tempo + 1) * self.settings.block_time

    # -- one epoch --------------------------------------------------------------------

    async def run_epoch(self, block: int | None = None) -> weights_pb2.Epoch:
        """Run and seal one epoch now, on the metagraph at ``block`` (default: the current
        block); raises EpochNotSealed when it cannot be sealed."""
        async with self._lock:
            try:
                epoch = await self._run(block)
            except EpochNotSealed as exc:
                telemetry.EPOCHS.labels(exc.outcome).inc()
                raise
            telemetry.EPOCHS.labels("sealed").inc()
            return epoch

    async def _run(self, block: int | None) -> weights_pb2.Epoch:
        settings = self.settings
        started = time.monotonic()
        start_time = self._clock()
        await self._registry.sync()
        snapshot = self._registry.snapshot()
        active = [c for c in snapshot.challenges if c.status is Status.ACTIVE]

        if block is None:
            block = await self._chain_call(self._chain.current_block())
        metagraph = await self._chain_call(self._chain.metagraph(block))
        hyper = await self._chain_call(self._chain.hyperparameters(block))
        hotkey_to_uid = metagraph.hotkey_to_uid
        burn_hotkey = metagraph.hotkey_of(settings.burn_uid)
        if burn_hotkey is None:
            raise EpochNotSealed(
                "burn_uid_missing",
                f"burn UID {settings.burn_uid} is not in the metagraph at block {metagraph.block} "
                f"({len(metagraph.neurons)} neurons)",
            )

        number = await self._store.last_epoch() + 1
        epoch_id = uuid.uuid4().hex
        request = challenge_pb2.GetWeightsRequest(
            epoch=number, epoch_id=epoch_id, netuid=settings.netuid, metagraph_block=metagraph.block
        )
        slugs = [c.slug for c in active]
        tokens = await self._registry_store.tokens_of(slugs)
        addresses = await self._shims.addresses()
        targets = [Target(s, addresses.get(s), tokens.get(s)) for s in slugs]
        collected = await self._collector.collect(targets, request)
        collect_seconds = time.monotonic() - started

        allocation = math_.allocate(
            [
                math_.ChallengeInput(c.slug, c.spec.share_ppb, got.entries)
                for c, got in zip(active, collected, strict=True)
            ],
            hotkey_to_uid,
            burn_uid=settings.burn_uid,
            policy=settings.policy,
        )
        try:
            planned = self._chain.plan_weights(dict(allocation.weights), hyper)
        except ValueError as exc:
            raise EpochNotSealed("conversion_refused", f"u16 conversion refused: {exc}") from exc

        results = [
            _result(c.slug, c.revision, got, part)
            for c, got, part in zip(active, collected, allocation.challenges, strict=True)
        ]
        create_time = self._clock()
        lifetime = settings.vector_lifetime or 2 * self.period(hyper)
        vector = weights_pb2.WeightVector(
            netuid=settings.netuid,
            mechanism_id=settings.mechanism_id,
            epoch=number,
            epoch_id=epoch_id,
            history_id=self._registry.history_id,
            metagraph_block=metagraph.block,
            policy=_POLICY[settings.policy],
            burn_uid=settings.burn_uid,
            weights=[
                weights_pb2.UidWeight(uid=uid, hotkey=metagraph.hotkey_of(uid) or "", weight=w)
                for uid, w in allocation.weights
            ],
            chain_weights=weights_pb2.ChainWeights(
                uids=planned.uids,
                values=planned.values,
                max_weight_limit=planned.max_weight_limit,
                min_allowed_weights=planned.min_allowed_weights,
                version_key=planned.version_key,
            ),
            inputs_sha256=vectors.inputs_digest(snapshot.revision, results),
        )
        vector.create_time.FromDatetime(create_time)
        vector.expire_time.FromDatetime(create_time + timedelta(seconds=lifetime))
        vectors.sign_vector(vector, self._signer)

        epoch = weights_pb2.Epoch(
            vector=vector,
            registry_revision=snapshot.revision,
            challenges=results,
            unallocated_share=allocation.unallocated_share,
            forfeited_share=allocation.forfeited_share,
            burn_weight=allocation.burn_weight,
            metagraph_neurons=len(metagraph.neurons),
        )
        epoch.start_time.FromDatetime(start_time)
        try:
            await self._store.insert_epoch(epoch)
        except EpochTaken as exc:
            # Another replica sealed this epoch a moment ago: serve its vector from now on.
            await self._feed.sync()
            raise EpochNotSealed("taken", f"{exc} (another master replica runs epochs)") from exc
        self._feed.publish(vector, vector.SerializeToString(deterministic=True))

        for result in results:
            telemetry.CHALLENGE_RESULTS.labels(
                result.slug,
                Status_.Name(result.status).removeprefix("CHALLENGE_EPOCH_STATUS_"),
                weights_pb2.ChallengeFailure.Name(result.failure).removeprefix(
                    "CHALLENGE_FAILURE_"
                ),
            ).inc()
        elapsed = time.monotonic() - started
        self.last_timings = {
            "collect": collect_seconds,
            "seal": elapsed - collect_seconds,
            "total": elapsed,
        }
        telemetry.EPOCH_SECONDS.observe(elapsed)
        log.info(
            "epoch sealed",
            extra={
                "epoch": number,
                "epoch_id": epoch_id,
                "registry_revision": snapshot.revision,
                "metagraph_block": metagraph.block,
                "challenges": len(results),
                "failed": [
                    r.slug for r in results if r.status == Status_.CHALLENGE_EPOCH_STATUS_FAILED
                ],
                "burn_weight": round(allocation.burn_weight, 6),
                "collect_seconds": round(collect_seconds, 4),
                "seconds": round(elapsed, 4),
            },
        )
        return epoch

    async def _chain_call(self, call: Awaitable[T]) -> T:
        """A chain read, bounded in time; any failure means no epoch now."""
        try:
            return await asyncio.wait_for(call, self.settings.chain_timeout)
        except TimeoutError as exc:
            raise EpochNotSealed(
                "chain_unavailable",
                f"the chain did not answer within {self.settings.chain_timeout:g}s",
            ) from exc
        except Exception as exc:  # whatever the SDK or the transport raises
            raise EpochNotSealed("chain_unavailable", f"chain read failed: {exc}") from exc


def tempo_position(block: int, netuid: int, tempo: int) -> tuple[int, int]:
    """(slot, blocks left) of ``block`` in the subnet's tempo cycle.

    Subtensor runs a subnet's epoch when ``(block + netuid + 1) % (tempo + 1) == 0``;
    ``slot`` numbers the cycles, ``blocks left`` counts down to the next run.
    """
    period = tempo + 1
    position = (block + netuid + 1) % period
    return (block + netuid + 1) // period, tempo - position


def _result(
    slug: str, revision: int, got: Collected, part: math_.ChallengeAllocation
) -> weights_pb2.ChallengeEpochResult:
    result = weights_pb2.ChallengeEpochResult(
        slug=slug,
        challenge_revision=revision,
        status=_STATUS[part.outcome],
        failure=weights_pb2.ChallengeFailure.ValueType(got.failure),
        reason=got.reason if got.entries is None else part.reason,
        share_assigned=part.share_assigned,
        share_applied=part.share_applied,
        raw_entry_count=len(got.entries) if got.entries is not None else 0,
        raw_size_bytes=got.size_bytes,
        paid_entry_count=part.paid_entry_count,
        scoring_version=got.scoring_version,
        latency=duration(got.latency),
    )
    if got.entries is not None:
        result.raw_sha256 = got.raw_sha256
    return result
