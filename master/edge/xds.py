"""The master's xDS server: one ADS stream (state of the world) per edge Envoy.

Envoy gets every listener, route, cluster, endpoint and TLS secret from here. The design
follows what mature control planes (go-control-plane, java-control-plane,
Istio) learned the hard way:

* **Versions are content hashes** (SHA-256 over deterministic serialization,
  type by type). They are stable across master restarts: an Envoy that
  reconnects to a restarted master with the same config already holds every
  version, so nothing is resent and nothing churns.
* **Serialize once.** A published configuration packs each resource into
  ``Any`` and encodes it once, ready to be concatenated into any response;
  the encoded body of a response is cached by (type, version) and shared by
  all streams. Per stream only the small envelope (version, type, nonce) is
  encoded.
* **Make before break, one step at a time.** Additions and updates go out
  CDS -> EDS -> SDS -> LDS -> RDS; what is removed goes away in the reverse
  order (RDS -> LDS -> SDS -> EDS -> CDS), so a route never points at a
  cluster Envoy does not have. (Envoy asks for a secret only once a listener
  names it; a changed secret still goes out before the listeners.) The
  first phase sends the new resources plus what Envoy still holds from
  before; the second, only when something was removed, sends the new set
  alone. Each step waits for Envoy's ACK or NACK (bounded by
  ``ack_timeout``) before the next one on that stream.
* **Cluster warming.** Envoy holds its CDS ACK until new or changed clusters
  have warmed, and an EDS cluster warms only once it receives its
  ``ClusterLoadAssignment`` - even an unchanged one. So the CDS step also ends
  as soon as Envoy asks for EDS after the push, and EDS is then sent for the
  clusters that changed even when the endpoints did not (otherwise Envoy
  waits for its ``initial_fetch_timeout``).
* **NACKs end the loop.** A request answering the latest nonce with
  ``error_detail`` set is a rejection: it is logged and counted, the rejected
  version is never offered again on that stream (Envoy keeps its last good
  config), and the rest of that configuration is not pushed to that Envoy
  (a route must not follow a rejected cluster). A later, different
  configuration is pushed normally. Requests carrying an older nonce are stale
  and ignored, as the protocol requires.
* **Debounced publication.** Registry changes come in bursts. A change that
  follows a quiet period (nothing published for ``debounce`` seconds) goes out
  at once, together with whatever else changed in the same turn of the event
  loop; changes that follow it closely are coalesced and go out ``debounce``
  seconds after the last one, but never later than ``debounce_cap`` after the
  first pending one. A single status change reaches the edge without waiting,
  and a burst costs at most two pushes.
* **Independent streams.** Each Envoy has its own stream task; a slow or dead
  Envoy only ever blocks its own stream.

Incremental (delta) xDS is not served: the edge's config is small, and one
protocol variant is easier to get right.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import itertools
import logging
import math
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.discovery.v3 import ads_pb2, ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2

from master.edge.model import EdgeResources
from master.edge.telemetry import (
    XDS_ACKS,
    XDS_NACKS,
    XDS_PUSHES,
    XDS_SNAPSHOT_VERSION,
    XDS_STREAMS,
)

log = logging.getLogger(__name__)

SERVICE_NAME = "envoy.service.discovery.v3.AggregatedDiscoveryService"
SERVICE_DESCRIPTOR = ads_pb2.DESCRIPTOR.services_by_name["AggregatedDiscoveryService"]

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"  # noqa: S105

# Metric labels and StreamInfo keys.
TYPE_LABELS: Mapping[str, str] = {
    CLUSTER: "cluster",
    ENDPOINT: "endpoint",
    LISTENER: "listener",
    ROUTE: "route",
    SECRET: "secret",
}
MAKE_ORDER = (CLUSTER, ENDPOINT, SECRET, LISTENER, ROUTE)
BREAK_ORDER = (ROUTE, LISTENER, SECRET, ENDPOINT, CLUSTER)

# Where each type sits in EdgeResources, the protobuf message it must be, and
# the field that names it.
_FIELDS: Mapping[str, tuple[str, str, str]] = {
    CLUSTER: ("clusters", "envoy.config.cluster.v3.Cluster", "name"),
    ENDPOINT: ("endpoints", "envoy.config.endpoint.v3.ClusterLoadAssignment", "cluster_name"),
    LISTENER: ("listeners", "envoy.config.listener.v3.Listener", "name"),
    ROUTE: ("routes", "envoy.config.route.v3.RouteConfiguration", "name"),
    SECRET: ("secrets", "envoy.extensions.transport_sockets.tls.v3.Secret", "name"),
}
# State-of-the-world types: every response carries all resources, and a
# resource missing from a response is removed by Envoy. EDS, SDS and RDS
# responses carry what Envoy asked for by name; absence removes nothing.
_WILDCARD_TYPES = frozenset({CLUSTER, LISTENER})
# Once Envoy has taken a response of the key type, it asks for the value type
# (clusters subscribe to their endpoints, listeners to their route configs).
_DEPENDENT: Mapping[str, str] = {CLUSTER: ENDPOINT, LISTENER: ROUTE}

# Tag of DiscoveryResponse.resources (field 2, length-delimited).
_RESOURCES_TAG = bytes(
    [discovery_pb2.DiscoveryResponse.DESCRIPTOR.fields_by_name["resources"].number << 3 | 2]
)
_VERSION_CHARS = 16
_PUSH_HISTORY = 256
_BODY_CACHE = 128
# How long close() waits for the streams to end.
_CLOSE_WAIT = 2.0


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


@dataclass(frozen=True)
class _Resource:
    """One resource of a published configuration, packed and encoded once."""

    name: str
    digest: bytes
    # The resource as an occurrence of DiscoveryResponse.resources: tag, length,
    # packed Any. Concatenated as is into every response that carries it.
    field: bytes
    # Clusters only: the ClusterLoadAssignment an EDS cluster subscribes to.
    eds_name: str | None = None


Content = Mapping[str, _Resource]


def _content_version(type_url: str, content: Content) -> str:
    """The version of a response: a hash of exactly the resources it carries."""
    digest = hashlib.sha256(type_url.encode())
    for name in sorted(content):
        digest.update(b"\0" + name.encode() + b"\0" + content[name].digest)
    return digest.hexdigest()[:_VERSION_CHARS]


def _pack(type_url: str, message: Any) -> _Resource:
    packed = any_pb2.Any(type_url=type_url, value=message.SerializeToString(deterministic=True))
    data = packed.SerializeToString(deterministic=True)
    eds_name = None
    if type_url == CLUSTER and message.type == cluster_pb2.Cluster.EDS:
        eds_name = message.eds_cluster_config.service_name or message.name
    name_field = _FIELDS[type_url][2]
    return _Resource(
        name=getattr(message, name_field),
        digest=hashlib.sha256(data).digest(),
        field=_RESOURCES_TAG + _varint(len(data)) + data,
        eds_name=eds_name,
    )


def check_resources(resources: EdgeResources) -> None:
    """Refuse resources of the wrong message type, unnamed or with duplicate names."""
    for type_url, (attribute, full_name, name_field) in _FIELDS.items():
        seen: set[str] = set()
        for message in getattr(resources, attribute):
            actual = getattr(getattr(message, "DESCRIPTOR", None), "full_name", None)
            if actual != full_name:
                raise TypeError(f"EdgeResources.{attribute} holds {actual!r}, not {full_name}")
            name = getattr(message, name_field)
            if not name:
                raise ValueError(f"a {TYPE_LABELS[type_url]} resource has no {name_field}")
            if name in seen:
                raise ValueError(f"duplicate {TYPE_LABELS[type_url]} resource {name!r}")
            seen.add(name)


@dataclass(frozen=True)
class _Snapshot:
    version: str
    resources: Mapping[str, Content]
    type_versions: Mapping[str, str]


def _build_snapshot(resources: EdgeResources) -> _Snapshot:
    by_type: dict[str, Content] = {}
    type_versions: dict[str, str] = {}
    for type_url in MAKE_ORDER:
        packed = [_pack(type_url, m) for m in getattr(resources, _FIELDS[type_url][0])]
        content = {r.name: r for r in sorted(packed, key=lambda r: r.name)}
        by_type[type_url] = content
        type_versions[type_url] = _content_version(type_url, content)
    overall = hashlib.sha256("\n".join(type_versions[t] for t in MAKE_ORDER).encode())
    return _Snapshot(overall.hexdigest()[:_VERSION_CHARS], by_type, type_versions)


# --------------------------------------------------------------------------------------
# What streams() reports


@dataclass(frozen=True)
class TypeStatus:
    """One resource type on one stream."""

    subscribed: bool
    # Names Envoy asked for (EDS, SDS, RDS); empty for the wildcard types.
    resource_names: tuple[str, ...]
    sent_version: str
    acked_version: str
    # The last version this Envoy rejected on this stream, and why.
    nacked_version: str
    nack_message: str
    pushes: int
    acks: int
    nacks: int


@dataclass(frozen=True)
class Push:
    """One DiscoveryResponse sent on a stream."""

    type: str  # "cluster", "endpoint", "listener", "route", "secret"
    version: str
    nonce: str
    resources: tuple[str, ...]
    snapshot: str


@dataclass(frozen=True)
class StreamInfo:
    stream_id: int
    node_id: str
    peer: str
    # By type label: "cluster", "endpoint", "listener", "route", "secret".
    types: Mapping[str, TypeStatus]
    # The configuration version this stream has nothing more to send or await
    # for ("" while a push or an ACK is outstanding). With a NACK, "settled"
    # means Envoy kept its previous config for the rejected part.
    settled_version: str
    # The most recent pushes on this stream, oldest first.
    pushes: tuple[Push, ...]


# --------------------------------------------------------------------------------------
# Per-stream protocol state


class _TypeState:
    def __init__(self, type_url: str) -> None:
        self.type_url = type_url
        self.label = TYPE_LABELS[type_url]
        self.subscribed = False
        self.names: frozenset[str] = frozenset()
        # Names covered by the last response (None: nothing answered yet).
        self.answered: frozenset[str] | None = None
        # What Envoy holds: from its ACKs, or claimed by its first request.
        self.acked_version = ""
        # The content of acked_version, when known (not after a reconnect to a
        # master that never sent it).
        self.applied: Content | None = None
        self.sent_version = ""
        self.sent_nonce = ""
        self.sent_content: Content = {}
        self.sent_snapshot = ""
        self.sent_at = 0.0
        # The last response awaits its ACK or NACK.
        self.awaiting = False
        # The stream's next step waits for this type (awaiting, not timed out).
        self.blocking = False
        # Envoy has taken the awaited response in: it answered, or asked for
        # the dependent type after it (the CDS ACK waits for cluster warming).
        self.processed = False
        self.nacked_version = ""
        self.nack_message = ""
        # EDS only: names of endpoints whose clusters changed in the last CDS
        # push; Envoy needs a response for them even if they did not change.
        self.warming: frozenset[str] = frozenset()
        self.pushes = 0
        self.acks = 0
        self.nacks = 0

    def status(self) -> TypeStatus:
        return TypeStatus(
            subscribed=self.subscribed,
            resource_names=tuple(sorted(self.names)),
            sent_version=self.sent_version,
            acked_version=self.acked_version,
            nacked_version=self.nacked_version,
            nack_message=self.nack_message,
            pushes=self.pushes,
            acks=self.acks,
            nacks=self.nacks,
        )


class _Action(enum.Enum):
    IDLE = "idle"
    WAIT = "wait"
    SEND = "send"


@dataclass(frozen=True)
class _Step:
    action: _Action
    type_url: str = ""
    content: Content | None = None
    version: str = ""
    deadline: float | None = None


_IDLE = _Step(_Action.IDLE)


class _Stream:
    """The protocol state of one ADS stream; no I/O here."""

    def __init__(self, stream_id: int, peer: str, ack_timeout: float) -> None:
        self.stream_id = stream_id
        self.peer = peer
        self.node_id = ""
        self.ack_timeout = ack_timeout
        self.types = {t: _TypeState(t) for t in MAKE_ORDER}
        self.wake = asyncio.Event()
        self.ended = False
        # A configuration (snapshot version) this Envoy rejected part of.
        self.halted = ""
        self.settled = ""
        self.history: deque[Push] = deque(maxlen=_PUSH_HISTORY)

    def info(self) -> StreamInfo:
        return StreamInfo(
            stream_id=self.stream_id,
            node_id=self.node_id,
            peer=self.peer,
            types={st.label: st.status() for st in self.types.values()},
            settled_version=self.settled,
            pushes=tuple(self.history),
        )

    def _log_extra(self, st: _TypeState, **more: Any) -> dict[str, Any]:
        return {"node": self.node_id, "stream": self.stream_id, "type": st.label, **more}

    # -- requests ---------------------------------------------------------------------

    def on_request(self, request: Any) -> None:
        if not self.node_id and request.node.id:
            self.node_id = request.node.id
            log.info(
                "envoy connected",
                extra={"node": self.node_id, "stream": self.stream_id, "peer": self.peer},
            )
        st = self.types.get(request.type_url)
        if st is None:
            log.debug(
                "request for a type this server does not serve",
                extra={"node": self.node_id, "type_url": request.type_url},
            )
            return
        nonce = request.response_nonce
        if st.sent_nonce and nonce != st.sent_nonce:
            # Answers a response that has since been superseded.
            log.debug("stale request ignored", extra=self._log_extra(st, nonce=nonce))
            return
        st.names = frozenset(n for n in request.resource_names if n != "*")
        self._note_dependent(st)
        if not st.subscribed:
            st.subscribed = True
            # A reconnecting Envoy says what it holds.
            st.acked_version = request.version_info
            return
        if not st.awaiting:
            # A new request on an answered nonce: names changed, or Envoy asks again.
            return
        st.awaiting = st.blocking = False
        st.processed = True
        if request.HasField("error_detail"):
            st.nacked_version = st.sent_version
            st.nack_message = request.error_detail.message
            st.nacks += 1
            self.halted = st.sent_snapshot
            if st.type_url == CLUSTER:
                self.types[ENDPOINT].warming = frozenset()
            XDS_NACKS.labels(st.label).inc()
            log.warning(
                "envoy rejected a configuration; it keeps its last good one",
                extra=self._log_extra(
                    st,
                    version=st.sent_version,
                    kept_version=request.version_info,
                    error=request.error_detail.message,
                ),
            )
            return
        st.acked_version = st.sent_version
        st.applied = st.sent_content
        st.acks += 1
        XDS_ACKS.labels(st.label).inc()
        log.debug("envoy accepted", extra=self._log_extra(st, version=st.sent_version))

    def _note_dependent(self, st: _TypeState) -> None:
        for parent, child in _DEPENDENT.items():
            if child == st.type_url and self.types[parent].awaiting:
                self.types[parent].processed = True

    # -- what to do next ---------------------------------------------------------------

    def next_step(self, snapshot: _Snapshot | None, now: float) -> _Step:
        if snapshot is None:
            return _IDLE
        blocker: _TypeState | None = None
        for phase, order in (("make", MAKE_ORDER), ("break", BREAK_ORDER)):
            if blocker is not None:
                break
            for type_url in order:
                st = self.types[type_url]
                if blocker is not None and not (
                    blocker.processed and _DEPENDENT.get(blocker.type_url) == type_url
                ):
                    break
                if st.blocking:
                    if now >= st.sent_at + self.ack_timeout:
                        self._timed_out(st)
                    else:
                        blocker = st
                        continue
                if self.halted == snapshot.version:
                    continue
                content = self._content(snapshot, st, phase)
                version = _content_version(type_url, content)
                if self._needs_push(st, content, version):
                    return _Step(_Action.SEND, type_url, content, version)
        if blocker is not None:
            return _Step(_Action.WAIT, deadline=blocker.sent_at + self.ack_timeout)
        return _IDLE

    def _timed_out(self, st: _TypeState) -> None:
        # Move on; a late ACK for this nonce still counts.
        st.blocking = False
        log.warning(
            "no ACK or NACK from envoy in time; moving on",
            extra=self._log_extra(st, version=st.sent_version, timeout_s=self.ack_timeout),
        )

    def _content(self, snapshot: _Snapshot, st: _TypeState, phase: str) -> Content:
        target = snapshot.resources[st.type_url]
        # During "make", what Envoy still holds from before stays in.
        previous = st.applied if phase == "make" and st.applied is not None else {}
        if st.type_url in _WILDCARD_TYPES:
            merged = {n: r for n, r in previous.items() if n not in target}
            merged.update(target)
            return merged
        out: dict[str, _Resource] = {}
        for name in st.names:
            resource = target.get(name) or previous.get(name)
            if resource is not None:
                out[name] = resource
        return out

    def _needs_push(self, st: _TypeState, content: Content, version: str) -> bool:
        if not st.subscribed:
            return False
        named = st.type_url not in _WILDCARD_TYPES
        if named and not st.names:
            return False  # Envoy asks for nothing of this type.
        if st.answered is None and version == st.acked_version:
            # Reconnected with what we would send: adopt it, keep the watch open.
            st.applied = content
            st.answered = st.names
            return False
        if st.warming:
            return True
        if named and (st.answered is None or not st.names <= st.answered):
            return True
        return version not in (st.acked_version, st.sent_version, st.nacked_version)

    def mark_sent(self, step: _Step, nonce: str, snapshot: _Snapshot, now: float) -> None:
        st = self.types[step.type_url]
        content = step.content or {}
        if st.type_url == CLUSTER:
            before = st.applied or {}
            changed = {
                r.eds_name
                for r in content.values()
                if r.eds_name is not None
                and (r.name not in before or before[r.name].digest != r.digest)
            }
            self.types[ENDPOINT].warming |= frozenset(changed)
        if st.type_url == ENDPOINT:
            st.warming = frozenset()
        st.sent_version = step.version
        st.sent_nonce = nonce
        st.sent_content = content
        st.sent_snapshot = snapshot.version
        st.sent_at = now
        st.awaiting = st.blocking = True
        st.processed = False
        st.answered = st.names | frozenset(content)
        st.pushes += 1
        names = tuple(sorted(content))
        self.history.append(Push(st.label, step.version, nonce, names, snapshot.version))
        XDS_PUSHES.labels(st.label).inc()
        log.debug(
            "pushed",
            extra=self._log_extra(st, version=step.version, resources=len(names)),
        )


# --------------------------------------------------------------------------------------
# The server


def _serialize_response(response: Any) -> bytes:
    """Responses are pre-encoded bytes; anything else is a message to serialize."""
    if isinstance(response, bytes):
        return response
    data: bytes = response.SerializeToString()
    return data


class XdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """Aggregated Discovery Service (state of the world) for the edge Envoys.

    Call :meth:`set_resources` (or :meth:`publish_now`) from the event loop
    that runs the gRPC server.
    """

    def __init__(
        self, *, debounce: float = 0.1, debounce_cap: float = 1.0, ack_timeout: float = 5.0
    ) -> None:
        if debounce < 0 or debounce_cap < debounce:
            raise ValueError("need 0 <= debounce <= debounce_cap")
        if ack_timeout <= 0:
            raise ValueError("ack_timeout must be positive")
        self._debounce = debounce
        self._debounce_cap = debounce_cap
        self._ack_timeout = ack_timeout
        self._snapshot: _Snapshot | None = None
        self._pending: EdgeResources | None = None
        self._first_pending = 0.0
        self._last_change = 0.0
        self._last_published = -math.inf
        self._debounce_task: asyncio.Task[None] | None = None
        self._streams: dict[int, _Stream] = {}
        self._stream_ids = itertools.count(1)
        # Nonces never repeat across master restarts, so an old one is always stale.
        self._nonce_prefix = secrets.token_hex(4)
        self._nonces = itertools.count(1)
        self._bodies: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._closed = False
        self._idle = asyncio.Event()
        self._idle.set()

    # -- configuration ------------------------------------------------------------------

    @property
    def version(self) -> str:
        """Version of the configuration being served ("" before the first one)."""
        return self._snapshot.version if self._snapshot is not None else ""

    def type_versions(self) -> dict[str, str]:
        """Version of each resource type in the served configuration, by type label."""
        if self._snapshot is None:
            return {}
        return {TYPE_LABELS[t]: v for t, v in self._snapshot.type_versions.items()}

    def set_resources(self, resources: EdgeResources) -> None:
        """Publish ``resources`` after the debounce; returns at once.

        The first configuration is published immediately. A change after a quiet
        period (nothing published for ``debounce`` s) is published on the next
        turn of the event loop, so the calls made in the same turn go out as one.
        Later ones go out ``debounce`` s after the last call, at most
        ``debounce_cap`` s after the first unpublished one. Only the last
        resources given are published.
        """
        if self._closed:
            raise RuntimeError("the xDS server is closed")
        check_resources(resources)
        if self._snapshot is None and self._pending is None:
            self._publish(resources)
            return
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        if self._pending is None:
            self._first_pending = now
        self._pending = resources
        self._last_change = now
        if self._debounce_task is None or self._debounce_task.done():
            self._debounce_task = loop.create_task(self._debounced(), name="xds-debounce")

    async def publish_now(self, resources: EdgeResources) -> None:
        """Publish ``resources`` at once, dropping any pending change."""
        if self._closed:
            raise RuntimeError("the xDS server is closed")
        check_resources(resources)
        await self._cancel_debounce()
        self._pending = None
        self._publish(resources)

    async def flush(self) -> None:
        """Publish the pending change, if any, without waiting for the debounce."""
        await self._cancel_debounce()
        pending, self._pending = self._pending, None
        if pending is not None:
            self._publish(pending)

    async def _cancel_debounce(self) -> None:
        task, self._debounce_task = self._debounce_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _debounced(self) -> None:
        while self._pending is not None:
            if self._first_pending - self._last_published >= self._debounce:
                due = self._first_pending  # after a quiet period: at once
            else:
                due = min(
                    self._last_change + self._debounce, self._first_pending + self._debounce_cap
                )
            delay = due - time.monotonic()
            if delay <= 0:
                pending, self._pending = self._pending, None
                try:
                    self._publish(pending)
                except Exception:
                    log.exception("edge configuration not published; keeping the last one")
                return
            await asyncio.sleep(delay)

    def _publish(self, resources: EdgeResources) -> None:
        snapshot = _build_snapshot(resources)
        previous = self._snapshot
        if previous is not None and previous.version == snapshot.version:
            log.debug("edge configuration unchanged", extra={"version": snapshot.version})
            return
        self._snapshot = snapshot
        self._last_published = time.monotonic()
        if previous is not None:
            with contextlib.suppress(KeyError):
                XDS_SNAPSHOT_VERSION.remove(previous.version)
        XDS_SNAPSHOT_VERSION.labels(snapshot.version).set(1)
        log.info(
            "edge configuration published",
            extra={
                "version": snapshot.version,
                "previous_version": previous.version if previous is not None else None,
                **{f"{TYPE_LABELS[t]}s": len(snapshot.resources[t]) for t in MAKE_ORDER},
                "streams": len(self._streams),
            },
        )
        for stream in self._streams.values():
            stream.wake.set()

    # -- status -------------------------------------------------------------------------

    def streams(self) -> list[StreamInfo]:
        """The connected Envoys and where each stands, by stream id."""
        return [self._streams[i].info() for i in sorted(self._streams)]

    # -- gRPC ---------------------------------------------------------------------------

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register ADS on ``server`` (responses are sent pre-encoded)."""
        handlers = {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self.StreamAggregatedResources,
                request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                response_serializer=_serialize_response,
            ),
            "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self.DeltaAggregatedResources,
                request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                response_serializer=_serialize_response,
            ),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
        )
        server.add_registered_method_handlers(SERVICE_NAME, handlers)

    async def DeltaAggregatedResources(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "this master serves state-of-the-world ADS only (StreamAggregatedResources); "
            "configure Envoy with api_type GRPC, not DELTA_GRPC",
        )

    async def StreamAggregatedResources(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        if self._closed:
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details("the master is shutting down")
            return
        stream = _Stream(next(self._stream_ids), context.peer(), self._ack_timeout)
        self._streams[stream.stream_id] = stream
        self._idle.clear()
        XDS_STREAMS.inc()
        reader = asyncio.create_task(self._read(stream, request_iterator))
        try:
            await self._drive(stream, context)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            del self._streams[stream.stream_id]
            XDS_STREAMS.dec()
            if not self._streams:
                self._idle.set()
            log.info(
                "envoy stream ended",
                extra={"node": stream.node_id, "stream": stream.stream_id, "peer": stream.peer},
            )
        if self._shutting_down():
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details("the master is shutting down")

    def _shutting_down(self) -> bool:
        return self._closed

    async def _read(self, stream: _Stream, requests: AsyncIterator[Any]) -> None:
        try:
            async for request in requests:
                stream.on_request(request)
                stream.wake.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("envoy stream broke", extra={"node": stream.node_id, "error": repr(exc)})
        finally:
            stream.ended = True
            stream.wake.set()

    async def _drive(self, stream: _Stream, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        loop = asyncio.get_running_loop()
        while not stream.ended and not self._closed:
            stream.wake.clear()
            snapshot = self._snapshot
            step = stream.next_step(snapshot, loop.time())
            idle = step.action is _Action.IDLE and snapshot is not None
            stream.settled = snapshot.version if idle and snapshot is not None else ""
            if step.action is _Action.SEND:
                assert snapshot is not None
                nonce = f"{self._nonce_prefix}-{next(self._nonces)}"
                stream.mark_sent(step, nonce, snapshot, loop.time())
                try:
                    await context.write(self._encode(step, nonce))
                except Exception as exc:
                    # The stream is gone (Envoy went away mid-write).
                    log.debug(
                        "write to envoy failed",
                        extra={"node": stream.node_id, "error": repr(exc)},
                    )
                    return
                continue
            timeout = None
            if step.deadline is not None:
                timeout = max(0.0, step.deadline - loop.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stream.wake.wait(), timeout)

    def _encode(self, step: _Step, nonce: str) -> bytes:
        key = (step.type_url, step.version)
        body = self._bodies.get(key)
        if body is None:
            content = step.content or {}
            body = b"".join(content[name].field for name in sorted(content))
            self._bodies[key] = body
            if len(self._bodies) > _BODY_CACHE:
                self._bodies.popitem(last=False)
        else:
            self._bodies.move_to_end(key)
        envelope: bytes = discovery_pb2.DiscoveryResponse(
            version_info=step.version, type_url=step.type_url, nonce=nonce
        ).SerializeToString()
        return envelope + body

    # -- shutdown -----------------------------------------------------------------------

    async def close(self) -> None:
        """End every stream, within a couple of seconds; Envoys keep their config and
        reconnect (to this master once it is back, or to another)."""
        self._closed = True
        await self._cancel_debounce()
        for stream in self._streams.values():
            stream.wake.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), _CLOSE_WAIT)
        if self._snapshot is not None:
            with contextlib.suppress(KeyError):
                XDS_SNAPSHOT_VERSION.remove(self._snapshot.version)
