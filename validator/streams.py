"""Long-lived streams from the master: connect, resume, reconnect.

``WatchRegistry`` and ``WatchWeights`` are list+watch streams that resume from a
position (a revision, an epoch) and a history id. The agent keeps each stream's
position in its store, written in the same transaction as what the message changed,
so after any disconnect or restart (its own or the master's) it asks for exactly what
it has not applied yet. A message whose application fails is not acknowledged by a
position change, so it is received again after the reconnect.

Reconnects wait a full-jitter exponential backoff (uniform in 0..min(max, min * 2^n)):
a master restart makes every validator reconnect at once, and the jitter spreads them.
Each (re)connect is a new signed call (:func:`platform_common.callauth.sign_call`): the
master checks the signature's freshness when the stream opens.

The channel pings the master every 30 s even when idle, so a dead connection (a master
host gone without closing its sockets) is noticed within about 40 s instead of never;
the master accepts pings every 10 s or more (``platform_common.rpc.KEEPALIVE_OPTIONS``).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from platform_network.v1 import common_pb2, registry_pb2
from validator import telemetry
from validator.store import Cursor, Store

log = logging.getLogger(__name__)

Reason = common_pb2.SnapshotReason

# Client keepalive within what the master's server permits (a ping every 10 s or more).
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # gRPC's own reconnection stays quick; the agent's backoff paces the calls.
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 10_000),
)
_MAX_EXPONENT = 32
# Statuses that need an operator rather than patience; logged as errors.
_OPERATOR = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})


@dataclass(frozen=True)
class Backoff:
    """Full-jitter exponential backoff between ``minimum`` and ``maximum`` seconds."""

    minimum: float
    maximum: float

    def delay(self, failures: int, rand: Callable[[], float] = random.random) -> float:
        """The pause after ``failures`` consecutive failures (0 for the first)."""
        cap = min(self.maximum, self.minimum * 2.0 ** min(failures, _MAX_EXPONENT))
        return cap * rand()


def open_channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


class _Call(Protocol):
    def __aiter__(self) -> AsyncIterator[Any]: ...

    def cancel(self) -> bool: ...


Connect = Callable[[], Awaitable[_Call]]
Apply = Callable[[Any], Awaitable[None]]


class StreamRunner:
    """Keeps one server stream open: connect, apply each message, reconnect on failure."""

    def __init__(self, name: str, connect: Connect, apply: Apply, backoff: Backoff) -> None:
        self.name = name
        self._connect = connect
        self._apply = apply
        self._backoff = backoff
        self.connected = False
        self.failures = 0

    def _set_connected(self, value: bool) -> None:
        self.connected = value
        telemetry.STREAM_CONNECTED.labels(self.name).set(1 if value else 0)

    async def run(self) -> None:
        """Until cancelled."""
        self._set_connected(False)
        while True:
            code, detail = await self._once()
            telemetry.STREAM_RECONNECTS.labels(self.name, code).inc()
            delay = self._backoff.delay(self.failures)
            self.failures += 1
            extra = {"stream": self.name, "code": code, "error": detail, "retry_in": delay}
            if code in {c.name for c in _OPERATOR}:
                log.error("the master refuses this validator's stream; retrying", extra=extra)
            else:
                log.warning("stream to the master ended; reconnecting", extra=extra)
            await asyncio.sleep(delay)

    async def _once(self) -> tuple[str, str]:
        """One connection: how it ended (a status name) and why."""
        call: _Call | None = None
        try:
            call = await self._connect()
            async for message in call:
                if not self.connected:
                    self._set_connected(True)
                    self.failures = 0
                    log.info("stream to the master open", extra={"stream": self.name})
                try:
                    await self._apply(message)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    # Not acknowledged (the position did not move): received again later.
                    log.exception(
                        "could not apply a stream message; reconnecting",
                        extra={"stream": self.name},
                    )
                    return "APPLY_FAILED", str(exc)
            return "OK", "the master ended the stream"
        except grpc.aio.AioRpcError as exc:
            return exc.code().name, exc.details() or ""
        finally:
            if call is not None:
                call.cancel()
            self._set_connected(False)


class RegistryFollower:
    """Applies ``WatchRegistry`` messages to the store's copy of the registry."""

    def __init__(self, store: Store, *, on_change: Callable[[], None] | None = None) -> None:
        self._store = store
        self._on_change = on_change
        self.cursor: Cursor | None = None
        self.server_epoch = ""

    async def load(self) -> None:
        self.cursor = await self._store.cursor("registry")
        await self._count()

    def request(self) -> registry_pb2.WatchRegistryRequest:
        cursor = self.cursor
        if cursor is None:
            return registry_pb2.WatchRegistryRequest()
        return registry_pb2.WatchRegistryRequest(
            since_revision=cursor.revision, history_id=cursor.history_id
        )

    async def apply(self, message: registry_pb2.WatchRegistryResponse) -> None:
        cursor = Cursor(message.cursor.history_id, message.cursor.revision)
        note_server(self, "registry", message.cursor.server_epoch)
        kind = message.WhichOneof("payload")
        if kind == "snapshot":
            reason = Reason.Name(message.snapshot.reason)
            telemetry.STREAM_SNAPSHOTS.labels("registry", reason).inc()
            log.log(
                logging.INFO
                if message.snapshot.reason == Reason.SNAPSHOT_REASON_INITIAL
                else logging.WARNING,
                "registry snapshot",
                extra={
                    "reason": reason,
                    "revision": cursor.revision,
                    "challenges": len(message.snapshot.challenges),
                },
            )
            await self._store.apply_registry(cursor, snapshot=list(message.snapshot.challenges))
        elif kind == "event":
            event = message.event
            if event.type == registry_pb2.RegistryEvent.TYPE_DELETE:
                await self._store.apply_registry(cursor, delete_slug=event.challenge.slug)
            else:
                await self._store.apply_registry(cursor, put=event.challenge)
            log.info(
                "registry event",
                extra={
                    "revision": cursor.revision,
                    "slug": event.challenge.slug,
                    "type": registry_pb2.RegistryEvent.Type.Name(event.type),
                },
            )
        elif cursor != self.cursor:
            await self._store.apply_registry(cursor)
        self.cursor = cursor
        telemetry.STREAM_REVISION.labels("registry").set(cursor.revision)
        if kind != "bookmark":
            await self._count()
            if self._on_change is not None:
                self._on_change()

    async def _count(self) -> None:
        challenges = await self._store.challenges()
        by_status: dict[str, int] = {
            name.removeprefix("CHALLENGE_STATUS_"): 0
            for name in registry_pb2.ChallengeStatus.keys()  # noqa: SIM118 - an enum wrapper
            if name != "CHALLENGE_STATUS_UNSPECIFIED"
        }
        for challenge in challenges:
            name = registry_pb2.ChallengeStatus.Name(challenge.status)
            key = name.removeprefix("CHALLENGE_STATUS_")
            by_status[key] = by_status.get(key, 0) + 1
        for status, count in by_status.items():
            telemetry.REGISTRY_CHALLENGES.labels(status).set(count)


class Follower(Protocol):
    server_epoch: str


def note_server(follower: Follower, stream: str, server_epoch: str) -> None:
    """Log when the master behind a stream changed (a restart, another replica)."""
    if server_epoch and server_epoch != follower.server_epoch:
        if follower.server_epoch:
            log.info(
                "connected to another master process (a restart or another replica)",
                extra={"stream": stream, "server_epoch": server_epoch},
            )
        follower.server_epoch = server_epoch
