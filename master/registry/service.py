"""The ``platform_network.v1.Registry`` gRPC service."""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import grpc

from master.registry import convert
from master.registry.feed import FeedClosed, RegistryFeed
from master.registry.rules import Status, slug_violation
from master.registry.store import RegistryStore
from platform_common import metrics
from platform_common.refusals import FieldViolation, Refusal, invalid, invalid_field
from platform_common.rpc import CALLER
from platform_network.v1 import common_pb2, registry_pb2, registry_pb2_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]
Reason = common_pb2.SnapshotReason

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


class RegistryService(registry_pb2_grpc.RegistryServicer):
    def __init__(
        self, store: RegistryStore, feed: RegistryFeed, *, bookmark_interval: float
    ) -> None:
        self._store = store
        self._feed = feed
        self._bookmark_interval = bookmark_interval

    # -- admin writes ---------------------------------------------------------------

    async def CreateChallenge(
        self, request: registry_pb2.CreateChallengeRequest, context: Context
    ) -> registry_pb2.CreateChallengeResponse:
        if not request.HasField("challenge"):
            raise invalid_field("challenge", "is required")
        challenge, token = await self._write(
            "create", self._store.create(convert.spec_from_proto(request.challenge))
        )
        self._audit("challenge created", challenge.slug, challenge.revision)
        return registry_pb2.CreateChallengeResponse(
            challenge=convert.challenge_to_proto(challenge), token=token
        )

    async def UpdateChallenge(
        self, request: registry_pb2.UpdateChallengeRequest, context: Context
    ) -> registry_pb2.Challenge:
        paths = list(request.update_mask.paths)
        patch = convert.spec_from_proto(request.challenge)
        challenge = await self._write(
            "update",
            self._store.update(request.slug, patch, paths, request.expected_revision),
        )
        self._audit("challenge updated", challenge.slug, challenge.revision, fields=paths)
        return convert.challenge_to_proto(challenge)

    async def SetChallengeStatus(
        self, request: registry_pb2.SetChallengeStatusRequest, context: Context
    ) -> registry_pb2.Challenge:
        status = convert.status_from_proto(request.status)
        if status is None:
            allowed = ", ".join(f"CHALLENGE_STATUS_{s.name}" for s in Status)
            raise invalid_field("status", f"must be one of {allowed}; got {request.status}")
        challenge, changed = await self._write(
            "set_status",
            self._store.set_status(request.slug, status, request.expected_revision, request.reason),
        )
        if changed:
            self._audit(
                "challenge status changed",
                challenge.slug,
                challenge.revision,
                status=status.name,
                reason=request.reason,
            )
        return convert.challenge_to_proto(challenge)

    async def DeleteChallenge(
        self, request: registry_pb2.DeleteChallengeRequest, context: Context
    ) -> registry_pb2.DeleteChallengeResponse:
        revision = await self._write(
            "delete", self._store.delete(request.slug, request.expected_revision)
        )
        self._audit("challenge deleted", request.slug, revision)
        return registry_pb2.DeleteChallengeResponse(revision=revision)

    async def RotateChallengeToken(
        self, request: registry_pb2.RotateChallengeTokenRequest, context: Context
    ) -> registry_pb2.RotateChallengeTokenResponse:
        challenge, token = await self._write(
            "rotate_token", self._store.rotate_token(request.slug, request.expected_revision)
        )
        self._audit("challenge token rotated", challenge.slug, challenge.revision)
        return registry_pb2.RotateChallengeTokenResponse(
            challenge=convert.challenge_to_proto(challenge), token=token
        )

    # -- reads ---------------------------------------------------------------------

    async def GetChallenge(
        self, request: registry_pb2.GetChallengeRequest, context: Context
    ) -> registry_pb2.Challenge:
        return convert.challenge_to_proto(await self._store.get(request.slug))

    async def ListChallenges(
        self, request: registry_pb2.ListChallengesRequest, context: Context
    ) -> registry_pb2.ListChallengesResponse:
        size = request.page_size or DEFAULT_PAGE_SIZE
        if not 1 <= size <= MAX_PAGE_SIZE:
            raise invalid_field(
                "page_size", f"must be between 1 and {MAX_PAGE_SIZE}; got {request.page_size}"
            )
        statuses = []
        for i, value in enumerate(request.statuses):
            status = convert.status_from_proto(value)
            if status is None:
                raise invalid_field(f"statuses[{i}]", f"unknown status {value}")
            statuses.append(status)
        after = _decode_page_token(request.page_token)
        # One extra row tells whether another page follows.
        rows, revision = await self._store.list_challenges(
            limit=size + 1, after_slug=after, statuses=statuses
        )
        page = rows[:size]
        next_token = _encode_page_token(page[-1].slug) if len(rows) > size else ""
        return registry_pb2.ListChallengesResponse(
            challenges=[convert.challenge_to_proto(c) for c in page],
            next_page_token=next_token,
            revision=revision,
        )

    async def ListPublicChallenges(
        self, request: registry_pb2.ListPublicChallengesRequest, context: Context
    ) -> registry_pb2.ListPublicChallengesResponse:
        # Served from the feed's in-memory view: anonymous traffic never reaches the database.
        snapshot = self._feed.snapshot()
        return registry_pb2.ListPublicChallengesResponse(
            challenges=[
                convert.public_to_proto(c) for c in snapshot.challenges if c.status is Status.ACTIVE
            ],
            revision=snapshot.revision,
        )

    # -- watch -----------------------------------------------------------------------

    async def WatchRegistry(
        self, request: registry_pb2.WatchRegistryRequest, context: Context
    ) -> AsyncIterator[registry_pb2.WatchRegistryResponse]:
        if request.since_revision < 0:
            raise invalid_field(
                "since_revision", f"must be 0 or positive; got {request.since_revision}"
            )
        feed = self._feed
        metrics.WATCH_STREAMS.labels("registry").inc()
        try:
            position, first = await self._start_position(request)
            if first is not None:
                yield first
            elif position == feed.revision:
                # Nothing missed: confirm the position and show the server epoch at once.
                yield feed.bookmark(position)
            history = feed.history_id
            last_sent = time.monotonic()
            while True:
                if feed.history_id != history:
                    history = feed.history_id
                    position, message = self._snapshot(Reason.SNAPSHOT_REASON_UNKNOWN_REVISION)
                    yield message
                    last_sent = time.monotonic()
                    continue
                pending = feed.buffered_after(position)
                if pending is None:
                    pending = await feed.stored_after(position, feed.revision)
                if pending is None:
                    position, message = self._snapshot(Reason.SNAPSHOT_REASON_LAGGED)
                    yield message
                    last_sent = time.monotonic()
                    continue
                if pending:
                    for message in pending:
                        yield message
                    position = pending[-1].cursor.revision
                    last_sent = time.monotonic()
                    continue
                quiet_left = self._bookmark_interval - (time.monotonic() - last_sent)
                if quiet_left <= 0:
                    yield feed.bookmark(position)
                    last_sent = time.monotonic()
                    continue
                await feed.wait_after(position, quiet_left)
        except FeedClosed:
            if context.done():  # the client already went away
                return
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "server shutting down; reconnect with your last revision",
            )
        finally:
            metrics.WATCH_STREAMS.labels("registry").dec()

    async def _start_position(
        self, request: registry_pb2.WatchRegistryRequest
    ) -> tuple[int, registry_pb2.WatchRegistryResponse | None]:
        """Where a new stream starts, and the snapshot to send first if it cannot resume."""
        feed = self._feed
        since = request.since_revision
        if since == 0:
            return self._snapshot(Reason.SNAPSHOT_REASON_INITIAL)
        if request.history_id and request.history_id != feed.history_id:
            return self._snapshot(Reason.SNAPSHOT_REASON_UNKNOWN_REVISION)
        if since > feed.revision:
            await feed.sync()  # another replica may have committed it a moment ago
            if since > feed.revision:
                return self._snapshot(Reason.SNAPSHOT_REASON_UNKNOWN_REVISION)
        # Resumable if the events are still buffered in memory or still in the log.
        if feed.buffered_after(since) is None and await feed.stored_after(since, since + 1) is None:
            return self._snapshot(Reason.SNAPSHOT_REASON_COMPACTED)
        return since, None

    def _snapshot(self, reason: int) -> tuple[int, registry_pb2.WatchRegistryResponse]:
        metrics.WATCH_RESYNCS.labels("registry", Reason.Name(reason)).inc()  # type: ignore[arg-type]
        return self._feed.snapshot_response(reason)

    # -- helpers ---------------------------------------------------------------------

    async def _write(self, operation: str, write: Awaitable[T]) -> T:
        try:
            result = await write
        except Refusal as refusal:
            metrics.REGISTRY_WRITES.labels(operation, refusal.kind.value).inc()
            raise
        metrics.REGISTRY_WRITES.labels(operation, "ok").inc()
        try:
            await self._feed.sync()
        except Exception:
            # Committed regardless; the feed's own loop retries the read.
            log.warning("registry feed could not catch up after a write", exc_info=True)
            self._feed.wake()
        return result

    @staticmethod
    def _audit(message: str, slug: str, revision: int, **fields: Any) -> None:
        caller = CALLER.get()
        log.info(
            message,
            extra={"slug": slug, "revision": revision, "caller": caller.kind, **fields},
        )


def _encode_page_token(after_slug: str) -> str:
    return base64.urlsafe_b64encode(f"v1:{after_slug}".encode()).decode().rstrip("=")


def _decode_page_token(token: str) -> str:
    if not token:
        return ""
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, ValueError):  # ValueError covers non-ASCII and bad UTF-8
        text = ""
    after = text[3:]
    if not text.startswith("v1:") or slug_violation(after) is not None:
        raise invalid([FieldViolation("page_token", "is not a token returned by ListChallenges")])
    return after
