"""Sealed vectors in memory: the latest one pre-serialized, recent ones for replay.

``GetLatestWeights`` answers with the bytes serialized when the epoch was
sealed (no per-request work), and ``WatchWeights`` streams read the recent
list at their own pace. Vectors older than the buffer are replayed from the
store.

With several master replicas on one database, only one of them seals each
epoch. The others learn of it from the store: :meth:`WeightsFeed.follow` reads
the vectors sealed since the latest one in memory every poll interval, and the
epoch engine syncs at once when another replica took the epoch it was sealing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

from master.weights import telemetry
from master.weights.store import WeightsStore
from platform_network.v1 import weights_pb2

log = logging.getLogger(__name__)


class FeedClosed(Exception):
    """The feed stopped (server shutdown)."""


class WeightsFeed:
    def __init__(self, store: WeightsStore, *, buffer_size: int = 64) -> None:
        self._store = store
        self.latest: weights_pb2.WeightVector | None = None
        self.latest_bytes: bytes | None = None
        self.epoch = 0
        self.oldest_epoch = 0
        self._buffer_size = buffer_size
        self._recent: deque[tuple[int, weights_pb2.WeightVector]] = deque()
        # Every sealed vector with an epoch above the floor is in _recent.
        self._floor = 0
        self._changed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._closed = False
        self._follower: asyncio.Task[None] | None = None
        self._sync_lock = asyncio.Lock()

    async def load(self) -> None:
        """Load the latest sealed vector and the recent ones from the store."""
        recent = await self._store.recent_vectors(self._buffer_size + 1)
        if len(recent) > self._buffer_size:
            self._floor = weights_pb2.WeightVector.FromString(recent.pop(0)).epoch
        for raw in recent:
            self._add(weights_pb2.WeightVector.FromString(raw), raw)
        self.oldest_epoch = await self._store.oldest_epoch()

    def publish(self, vector: weights_pb2.WeightVector, raw: bytes) -> None:
        """Make a newly sealed vector the latest and wake every stream.

        A vector that is not newer than the latest is ignored: :meth:`sync` may
        have read it from the store first."""
        if vector.epoch <= self.epoch:
            return
        self._add(vector, raw)
        if not self.oldest_epoch:
            self.oldest_epoch = vector.epoch
        telemetry.WEIGHTS_EPOCH.set(vector.epoch)
        self._signal()

    async def sync(self) -> int:
        """Publish the vectors sealed in the store after the latest one here (by another
        master replica); how many."""
        published = 0
        async with self._sync_lock:
            while True:
                raws = await self._store.vectors_after(self.epoch, self._buffer_size)
                for raw in raws:
                    vector = weights_pb2.WeightVector.FromString(raw)
                    if vector.epoch > self.epoch:
                        self.publish(vector, raw)
                        published += 1
                if len(raws) < self._buffer_size:
                    return published

    def follow(self, interval: float) -> None:
        """Run :meth:`sync` every ``interval`` seconds until :meth:`close`."""
        if interval <= 0:
            raise ValueError("interval: must be > 0 seconds")
        self._follower = asyncio.create_task(self._follow(interval), name="weights-feed")

    async def _follow(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                published = await self.sync()
            except Exception as exc:
                log.warning("reading epochs sealed elsewhere failed", extra={"error": str(exc)})
            else:
                if published:
                    log.info(
                        "epochs sealed by another replica",
                        extra={"published": published, "epoch": self.epoch},
                    )

    def pruned(self, oldest_epoch: int) -> None:
        self.oldest_epoch = oldest_epoch

    async def close(self) -> None:
        self._closed = True
        self._signal()
        task, self._follower = self._follower, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def buffered_after(self, epoch: int) -> list[weights_pb2.WeightVector] | None:
        """Buffered vectors after ``epoch``; None if some are no longer buffered."""
        if epoch >= self.epoch:
            return []
        if epoch < self._floor:
            return None
        return [v for e, v in self._recent if e > epoch]

    async def stored_after(self, epoch: int, limit: int = 256) -> list[weights_pb2.WeightVector]:
        return [
            weights_pb2.WeightVector.FromString(raw)
            for raw in await self._store.vectors_after(epoch, limit)
        ]

    async def wait_after(self, epoch: int, within: float) -> None:
        """Wait until a vector newer than ``epoch`` is sealed, or ``within`` s pass."""
        if self._closed:
            raise FeedClosed
        if self.epoch > epoch:
            return
        await asyncio.wait({self._changed}, timeout=within)
        if self._closed:
            raise FeedClosed

    def _add(self, vector: weights_pb2.WeightVector, raw: bytes) -> None:
        self._recent.append((vector.epoch, vector))
        if len(self._recent) > self._buffer_size:
            self._floor = self._recent.popleft()[0]
        self.latest, self.latest_bytes, self.epoch = vector, raw, vector.epoch

    def _signal(self) -> None:
        previous, self._changed = self._changed, asyncio.get_running_loop().create_future()
        previous.set_result(None)
