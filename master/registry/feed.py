"""The registry feed: the event log tailed into memory and fanned out to watchers.

One task tails ``registry_events`` (woken at once by local writes, polling for
writes of other master replicas). Each event is turned into its
``WatchRegistryResponse`` once and appended to a bounded in-memory log that
every ``WatchRegistry`` stream reads at its own pace, so publishing costs the
same for 1 or 1,000 watchers and a slow watcher holds no memory: if it falls
behind the buffer it gets a LAGGED resync snapshot instead.

The feed also keeps the materialised registry (slug -> challenge) at its
revision, which serves snapshots and the public catalogue without touching
the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp

from master.registry import convert
from master.registry.rules import Challenge
from master.registry.store import EVENT_DELETE, Head, RegistryStore, StoredEvent
from platform_common import metrics
from platform_network.v1 import common_pb2, registry_pb2

log = logging.getLogger(__name__)

SnapshotReason = common_pb2.SnapshotReason


class FeedClosed(Exception):
    """The feed stopped (server shutdown)."""


@dataclass(frozen=True)
class Snapshot:
    revision: int
    challenges: tuple[Challenge, ...]


class RegistryFeed:
    def __init__(
        self,
        store: RegistryStore,
        *,
        poll_interval: float = 1.0,
        buffer_size: int = 4096,
    ) -> None:
        self._store = store
        self._poll_interval = poll_interval
        self._buffer_size = buffer_size
        self.server_epoch = secrets.token_hex(8)
        self.history_id = ""
        self.revision = 0
        self._view: dict[str, Challenge] = {}
        # _log[i] holds the response for revision _log_first + i.
        self._log: list[registry_pb2.WatchRegistryResponse] = []
        self._log_first = 1
        self._changed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._wake = asyncio.Event()
        self._pull_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # -- life cycle -------------------------------------------------------------

    async def start(self) -> None:
        head, challenges = await self._store.snapshot()
        self._reset(head, challenges)
        self._task = asyncio.create_task(self._tail(), name="registry-feed")

    async def close(self) -> None:
        """Stop tailing and release every waiting stream with :class:`FeedClosed`."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._signal()

    def wake(self) -> None:
        """Tail now instead of at the next poll."""
        self._wake.set()

    async def sync(self) -> None:
        """Tail once, now. Write RPCs call this before answering, so a client that
        wrote and then watches (or lists public challenges) sees its own write."""
        await self._pull()

    # -- reads for streams ----------------------------------------------------------

    def snapshot(self) -> Snapshot:
        return Snapshot(self.revision, tuple(self._view[slug] for slug in sorted(self._view)))

    def cursor(self, revision: int) -> common_pb2.WatchCursor:
        return common_pb2.WatchCursor(
            server_epoch=self.server_epoch, history_id=self.history_id, revision=revision
        )

    def snapshot_response(self, reason: int) -> tuple[int, registry_pb2.WatchRegistryResponse]:
        snap = self.snapshot()
        return snap.revision, registry_pb2.WatchRegistryResponse(
            cursor=self.cursor(snap.revision),
            snapshot=registry_pb2.RegistrySnapshot(
                reason=common_pb2.SnapshotReason.ValueType(reason),
                challenges=[convert.challenge_to_proto(c) for c in snap.challenges],
            ),
        )

    def bookmark(self, revision: int) -> registry_pb2.WatchRegistryResponse:
        return registry_pb2.WatchRegistryResponse(
            cursor=self.cursor(revision), bookmark=registry_pb2.Bookmark()
        )

    def buffered_after(self, revision: int) -> list[registry_pb2.WatchRegistryResponse] | None:
        """Buffered events after ``revision``; None if they are no longer buffered."""
        if revision >= self.revision:
            return []
        if revision + 1 < self._log_first:
            return None
        return self._log[revision + 1 - self._log_first :]

    async def stored_after(
        self, revision: int, upto: int
    ) -> list[registry_pb2.WatchRegistryResponse] | None:
        """Events after ``revision`` up to ``upto`` read from the store; None if compacted."""
        out: list[registry_pb2.WatchRegistryResponse] = []
        cursor = revision
        while cursor < upto:
            head, events = await self._store.events_after(cursor, limit=1000)
            if cursor < head.compacted_revision or not events or events[0].revision != cursor + 1:
                return None
            for event in events:
                if event.revision > upto:
                    return out
                out.append(self._response(event))
                cursor = event.revision
        return out

    async def wait_after(self, revision: int, within: float) -> bool:
        """Wait until the feed is past ``revision``; False on timeout. Raises FeedClosed."""
        if self._closed:
            raise FeedClosed
        if self.revision > revision:
            return True
        done, _ = await asyncio.wait({self._changed}, timeout=within)
        if self._closed:
            raise FeedClosed
        return bool(done) and self.revision > revision

    # -- tailing ------------------------------------------------------------------

    async def _tail(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll_interval)
            self._wake.clear()
            try:
                await self._pull()
            except asyncio.CancelledError:
                raise
            except Exception:
                metrics.REGISTRY_FEED_ERRORS.inc()
                log.exception("registry feed could not read the event log; retrying")
                await asyncio.sleep(min(self._poll_interval, 1.0))

    async def _pull(self) -> None:
        async with self._pull_lock:
            await self._pull_locked()

    async def _pull_locked(self) -> None:
        while True:
            head, events = await self._store.events_after(self.revision, limit=1000)
            if (
                head.history_id != self.history_id
                or (events and events[0].revision != self.revision + 1)
                or (not events and head.revision > self.revision)
            ):
                # The log moved past us (compaction) or the database changed:
                # reload and let every stream resync.
                log.warning(
                    "registry feed lost continuity; reloading",
                    extra={"feed_revision": self.revision, "head_revision": head.revision},
                )
                fresh_head, challenges = await self._store.snapshot()
                self._reset(fresh_head, challenges)
                self._signal()
                return
            if not events:
                return
            self._apply(events)
            if len(events) < 1000:
                return

    def _apply(self, events: Sequence[StoredEvent]) -> None:
        for event in events:
            if event.type == EVENT_DELETE:
                self._view.pop(event.challenge.slug, None)
            else:
                self._view[event.challenge.slug] = event.challenge
            self._log.append(self._response(event))
            self.revision = event.revision
        overflow = len(self._log) - self._buffer_size
        if overflow > self._buffer_size // 4:
            del self._log[:overflow]
            self._log_first += overflow
        metrics.REGISTRY_REVISION.set(self.revision)
        self._signal()

    def _response(self, event: StoredEvent) -> registry_pb2.WatchRegistryResponse:
        ts = Timestamp()
        ts.FromDatetime(event.commit_time)
        kind = (
            registry_pb2.RegistryEvent.TYPE_DELETE
            if event.type == EVENT_DELETE
            else registry_pb2.RegistryEvent.TYPE_PUT
        )
        return registry_pb2.WatchRegistryResponse(
            cursor=self.cursor(event.revision),
            event=registry_pb2.RegistryEvent(
                type=kind,
                challenge=convert.challenge_to_proto(event.challenge),
                revision=event.revision,
                commit_time=ts,
            ),
        )

    def _reset(self, head: Head, challenges: Sequence[Challenge]) -> None:
        self.history_id = head.history_id
        self.revision = head.revision
        self._view = {c.slug: c for c in challenges}
        self._log = []
        self._log_first = head.revision + 1
        metrics.REGISTRY_REVISION.set(self.revision)

    def _signal(self) -> None:
        previous, self._changed = self._changed, asyncio.get_running_loop().create_future()
        previous.set_result(None)
