"""Edge state in, Envoy xDS resources out: the one place that knows Envoy's config model.

Pure on purpose (no I/O, no gRPC, no clock): the xDS server hashes what this returns to
version it, so equal states must give byte-identical resources, and the tests pin the
output with golden files and run it in a real Envoy (``envoy --mode validate`` and traffic).

Shape of the edge, per request, in filter order (names are the HCM filter names that route
and virtual-host ``typed_per_filter_config`` refer to):

1. ``envoy.filters.http.header_mutation`` removes every header under the platform's
   ``x-platform-`` prefix a client sent, before anything can read or trust it, and the headers
   some servers take as the real path (``x-original-url``, ``x-forwarded-prefix`` and the
   like). The HCM also rejects header names with underscores,
   so ``x_platform_verified_hotkey`` cannot reach a framework that folds ``_`` into ``-``.
2. ``rate_limit_ip`` (local rate limit, inert at listener level, enforced per route) refuses
   floods before any body is buffered: on public routes at the challenge's per-address rate,
   on signed routes at the deployment's ``authz_rate_per_ip_per_minute``, so that a flood of
   forged or unsigned requests is refused before Envoy asks the master to check it.
3. ``envoy.filters.http.buffer`` enforces the challenge's body limit on public routes (413
   past ``max_request_body_bytes``). Signed routes leave it off: ext_authz's
   ``with_request_body`` (``allow_partial_message: false``) buffers the body for the check
   and answers the same 413 past the same limit (checked in Envoy 1.40), so buffering twice
   would add nothing. Only requests are buffered; responses (server-sent events included)
   stream through untouched.
4. ``envoy.filters.http.ext_authz`` asks the master (gRPC, HTTP/2, bearer token) on signed
   routes only, fails closed (503 when the master is unreachable) and sends the body as bytes.
5. ``rate_limit_hotkey`` runs after ext_authz, so it keys on the verified hotkey header the
   master set, never on anything the client chose.
6. The router.

Rate limits are per key: each route's local rate limit config carries its own ``rate_limits``
action (client address or verified hotkey) and one wildcard descriptor (empty value), so Envoy
keeps an LRU of up to ``max_rate_limit_keys`` token buckets per route, one per distinct key,
and does not also charge the route-wide default bucket (``always_consume_default_token_bucket:
false``). "N per minute" is a bucket of N tokens refilled evenly (one token every 60/N s, or
several at the 50 ms minimum interval). A refused request gets 429 with ``retry-after`` (the
refill interval, rounded up to whole seconds) and the ``x-ratelimit-*`` headers.

Paths: the HCM normalizes (RFC 3986: dot segments resolved, percent-encoded unreserved
characters decoded, slashes merged) and rejects escaped slashes before routing. Routes, in
order: paths a lenient upstream could still decode into a different path (encoded ``%``,
malformed escapes, overlong UTF-8 lead bytes) get 400; then per challenge, by slug, its
blocked prefixes (whole segment, case-insensitive, plus the ``;``, ``.`` and ``%``
continuations that servers strip or decode into the same route) get 403; its signed prefixes
(same matching, most specific first) go through ext_authz; the rest of ``/challenges/{slug}``
is public; anything else is a JSON 404. Upstreams see the path with ``/challenges/{slug}``
cut off (``/`` for the challenge root).

Connections (Envoy's edge recommendations, since Envoy's defaults suit a trusted network):
request headers must arrive within ``request_headers_timeout_ms`` (408 otherwise, against
slow-header clients that hold connections open), idle connections close after
``idle_timeout_ms``, HTTP/2 clients get at most ``HTTP2_MAX_CONCURRENT_STREAMS`` streams per
connection and 64 KiB / 1 MiB flow-control windows, and every downstream and upstream
connection buffers at most ``CONNECTION_BUFFER_BYTES`` before flow control pushes back
(bodies the buffer filter or ext_authz must hold whole are bounded by their own limits).
The connection cap and the heap limit are process-wide: they are in the bootstrap
(``envoy/bootstrap.yaml``, Envoy's overload manager).

TLS: with ``tls_cert_file`` and ``tls_key_file`` the listener serves HTTPS only (TLS 1.2 or
later, ALPN ``h2`` then ``http/1.1``), so a miner's signed request and its answer cannot be
read on the way: the signature stops forgery, not someone copying a submission. The listener
names the certificate (``TLS_SECRET_NAME``) and Envoy fetches it over the same ADS stream
(SDS): a ``Secret`` that holds the two paths, not the key itself, so the key never leaves
Envoy's filesystem. Envoy watches the files' directory and loads a pair moved into
place there (cert-manager's renewal of a mounted Kubernetes Secret swaps a symlink in that
directory) into new connections without restarting; a pair it cannot load is refused and the
previous one kept. A changed path is an SDS update alone: the listener, whose updates drain
connections, does not change.

Upstreams: a challenge whose public endpoint is an IP literal gets an EDS cluster and a
``ClusterLoadAssignment`` (endpoint moves are cheap EDS updates); a hostname gets a STRICT_DNS
cluster with the endpoint inline and no EDS resource, because Envoy resolves no names in EDS.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

# Extension modules are imported for their side effect too: packing a message into ``Any``
# (and reading it back) needs its descriptor in the default pool.
from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    protocol_pb2,
    substitution_format_string_pb2,
)
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.access_loggers.filters.cel.v3 import cel_pb2
from envoy.extensions.access_loggers.stream.v3 import stream_pb2
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.extensions.filters.http.buffer.v3 import buffer_pb2
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import common_pb2 as tls_common_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.v3 import http_status_pb2, percent_pb2, token_bucket_pb2
from google.protobuf import duration_pb2, json_format, struct_pb2, wrappers_pb2

from master.edge.model import (
    AUTHZ_CLUSTER,
    BUILTIN_BLOCKED_PREFIXES,
    LISTENER_NAME,
    PATH_OVERRIDE_HEADERS,
    PLATFORM_HEADER_PREFIX,
    PUBLIC_PREFIX,
    ROUTE_CONFIG_NAME,
    STAT_PREFIX,
    VERIFIED_HOTKEY_HEADER,
    EdgeChallenge,
    EdgeResources,
    EdgeSettings,
    EdgeState,
    cluster_name,
)

# HTTP filter names, as route and virtual-host typed_per_filter_config refer to them.
HEADER_MUTATION_FILTER = "envoy.filters.http.header_mutation"
RATE_LIMIT_IP_FILTER = "rate_limit_ip"
BUFFER_FILTER = "envoy.filters.http.buffer"
EXT_AUTHZ_FILTER = "envoy.filters.http.ext_authz"
RATE_LIMIT_HOTKEY_FILTER = "rate_limit_hotkey"
ROUTER_FILTER = "envoy.filters.http.router"

HCM_FILTER = "envoy.filters.network.http_connection_manager"
CEL_FILTER = "envoy.access_loggers.extension_filters.cel"
# Envoy's response code details on the 503 of its overload manager (stop_accepting_requests).
OVERLOAD_CODE_DETAILS = "overload"
# ... and on its 403 to an upgrade or CONNECT the route does not allow.
UPGRADE_FAILED_CODE_DETAILS = "upgrade_failed"
TLS_TRANSPORT_SOCKET = "envoy.transport_sockets.tls"
# The SDS secret the HTTPS listener takes its certificate from.
TLS_SECRET_NAME = "edge-tls"  # noqa: S105 - a resource name, no secret
# What the HTTPS listener offers in ALPN, preferred first.
TLS_ALPN = ("h2", "http/1.1")
VIRTUAL_HOST_NAME = "edge"
HTTP_PROTOCOL_OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

# Descriptor keys of the per-route rate limits.
IP_DESCRIPTOR_KEY = "remote_address"
HOTKEY_DESCRIPTOR_KEY = "hotkey"

# Listener-level body limits. Never in force (the virtual host disables buffering and
# ext_authz; routes set their own limit), and constant so the listener, whose updates drain
# connections, depends on the deployment settings only.
LISTENER_BODY_LIMIT = 64 * 1024 * 1024

# Per-connection limits of a public listener (Envoy's "edge proxy" best practices).
HTTP2_MAX_CONCURRENT_STREAMS = 100
HTTP2_STREAM_WINDOW_BYTES = 64 * 1024
HTTP2_CONNECTION_WINDOW_BYTES = 1024 * 1024
CONNECTION_BUFFER_BYTES = 32 * 1024

# Envoy refuses token bucket refills more frequent than this.
MIN_FILL_INTERVAL_MS = 50

# Continuations of a segment name that common servers strip or decode back into the same
# route: matrix parameters (Tomcat, Spring), suffixes (Spring suffix matching, trailing dots on
# Windows) and percent escapes (trailing %20, encoded separators). Blocked and signed prefixes
# match them too, so ``/internal;x`` is refused and ``/submit;x`` still needs a signature.
SEGMENT_CONTINUATIONS = (";", ".", "%")

# Paths a lenient upstream could decode into a different path than the one routed here.
# Envoy's normalization already decodes percent-encoded unreserved characters (``%69`` is
# ``i`` before routing) and resolves dot segments; it keeps an encoded "%" (double decoding:
# ``%2569``), malformed escapes (``%zz``, a lone ``%``) and lead bytes that only occur in
# overlong or invalid UTF-8 (``%c0%ae`` is an overlong "."), which are refused here, as is any
# encoded unreserved character that survives normalization (none should). Also refused:
# encoded control characters anywhere (``%00``-``%1F``, ``%7F``: servers truncate at NUL or
# trim them), a segment that starts with whitespace, with ``;`` or ``%3b`` or with three
# dots, because servers that trim whitespace and trailing dots or drop matrix parameters (some
# after decoding them) turn ``/ /internal``, ``/%3bx/internal`` or ``/.../internal`` into
# ``//internal``, which they then merge into ``/internal`` after the edge routed it as public,
# and for the same reason a dot segment followed by any of those (``/..;/``, ``/.%20/``,
# ``/..%3bx/``: Envoy does not resolve them, and Tomcat reads ``/x/..;/internal`` as
# ``/internal``).
# RE2 syntax, matched against the whole normalized path (no query); kept small for Envoy's
# RE2 program size limit.
NON_CANONICAL_PATH_REGEX = (
    r".*(?:%(?:25|[01][0-9a-fA-F]|7[fF]"
    r"|[46][1-9a-fA-F]|[57][0-9aA]|3[0-9]|2[dDeE]|5[fF]|7[eE]"
    r"|[cC][01]|[eE]0%[89]|[fF]0%8|[fF][5-9a-fA-F]"
    r"|[^0-9a-fA-F]|[0-9a-fA-F][^0-9a-fA-F]|[0-9a-fA-F]?$)"
    r"|/(?:\.{0,2}(?:%20|;|%3[bB]|[ \t])|\.\.\.)).*"
)

# Request header names removed at the edge (names reach filters in lower case; letters and
# "-" only, so each name is its own regular expression).
REMOVED_REQUEST_HEADERS_REGEX = "|".join((f"{PLATFORM_HEADER_PREFIX}.*", *PATH_OVERRIDE_HEADERS))

ACCESS_LOG_FORMAT: Mapping[str, str] = {
    "time": "%START_TIME%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "status": "%RESPONSE_CODE%",
    "flags": "%RESPONSE_FLAGS%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "cluster": "%UPSTREAM_CLUSTER%",
    "duration_ms": "%DURATION%",
    "bytes_in": "%BYTES_RECEIVED%",
    "bytes_out": "%BYTES_SENT%",
    "client": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
}


def translate(state: EdgeState) -> EdgeResources:
    """The Envoy resources that implement ``state``'s edge, each tuple sorted by name."""
    settings = state.settings
    if settings.access_log not in ("errors", "all", "off"):
        raise ValueError("access_log must be 'errors', 'all' or 'off'")
    challenges = sorted(state.challenges, key=lambda c: c.slug)
    slugs = [c.slug for c in challenges]
    if len(set(slugs)) != len(slugs):
        raise ValueError("duplicate challenge slug in edge state")
    clusters = [_authz_cluster(settings)] + [_challenge_cluster(c, settings) for c in challenges]
    endpoints = [
        _load_assignment(cluster_name(c.slug), c.upstream_host, c.upstream_port)
        if _placed(c)
        # Routed but not placed yet: no endpoint, so miners get the safe 503.
        else endpoint_pb2.ClusterLoadAssignment(cluster_name=cluster_name(c.slug))
        for c in challenges
        if _is_ip(c.upstream_host) or not _placed(c)
    ]
    return EdgeResources(
        clusters=tuple(sorted(clusters, key=lambda m: m.name)),
        endpoints=tuple(sorted(endpoints, key=lambda m: m.cluster_name)),
        listeners=(_listener(settings),),
        routes=(_route_configuration(challenges, settings),),
        secrets=(_tls_secret(settings),) if settings.tls_cert_file else (),
    )


def static_bootstrap(
    resources: EdgeResources, *, admin_host: str, admin_port: int
) -> dict[str, Any]:
    """An Envoy bootstrap running ``resources`` with no control plane, as a JSON-ready dict.

    EDS clusters get their load assignment inline (STATIC, or STRICT_DNS for hostnames), the
    connection manager gets the route configuration inline instead of RDS, and TLS secrets
    are static secrets instead of SDS. Used to validate translated configs and to run the
    edge in tests.
    """
    assignments = {cla.cluster_name: cla for cla in resources.endpoints}
    routes = {rc.name: rc for rc in resources.routes}
    bootstrap = bootstrap_pb2.Bootstrap()
    bootstrap.admin.address.CopyFrom(_socket_address(admin_host, admin_port))
    for source in resources.clusters:
        cluster = bootstrap.static_resources.clusters.add()
        cluster.CopyFrom(source)
        if cluster.type != cluster_pb2.Cluster.EDS:
            continue
        assignment = assignments.get(cluster.name)
        if assignment is None:
            raise ValueError(f"no endpoints for EDS cluster {cluster.name}")
        cluster.ClearField("eds_cluster_config")
        cluster.type = _discovery_type(
            ep.endpoint.address.socket_address.address
            for group in assignment.endpoints
            for ep in group.lb_endpoints
        )
        cluster.load_assignment.CopyFrom(assignment)
    bootstrap.static_resources.secrets.extend(resources.secrets)
    for source_listener in resources.listeners:
        listener = bootstrap.static_resources.listeners.add()
        listener.CopyFrom(source_listener)
        for chain in listener.filter_chains:
            if chain.transport_socket.name == TLS_TRANSPORT_SOCKET:
                tls = tls_pb2.DownstreamTlsContext()
                chain.transport_socket.typed_config.Unpack(tls)
                for sds in tls.common_tls_context.tls_certificate_sds_secret_configs:
                    sds.ClearField("sds_config")  # a static secret, by name
                _pack(chain.transport_socket.typed_config, tls)
            for network_filter in chain.filters:
                if network_filter.name != HCM_FILTER:
                    continue
                hcm = hcm_pb2.HttpConnectionManager()
                network_filter.typed_config.Unpack(hcm)
                if hcm.HasField("rds"):
                    route_config = routes.get(hcm.rds.route_config_name)
                    if route_config is None:
                        raise ValueError(f"no route configuration {hcm.rds.route_config_name}")
                    hcm.ClearField("rds")
                    hcm.route_config.CopyFrom(route_config)
                _pack(network_filter.typed_config, hcm)
    document: dict[str, Any] = json_format.MessageToDict(
        bootstrap, preserving_proto_field_name=True
    )
    return document


# ---------------------------------------------------------------------------------------------
# Clusters and endpoints


def _challenge_cluster(challenge: EdgeChallenge, settings: EdgeSettings) -> Any:
    """EDS for an IP upstream; STRICT_DNS with the endpoint inline for a hostname.

    EDS endpoints must be IP literals (Envoy resolves no names in a ClusterLoadAssignment and
    rejects the whole assignment), so a hostname upstream has no EDS resource.
    """
    name = cluster_name(challenge.slug)
    cluster = cluster_pb2.Cluster(
        name=name,
        connect_timeout=_duration_ms(settings.connect_timeout_ms),
        per_connection_buffer_limit_bytes=_u32(CONNECTION_BUFFER_BYTES),
    )
    if _is_ip(challenge.upstream_host) or not _placed(challenge):
        cluster.type = cluster_pb2.Cluster.EDS
        cluster.eds_cluster_config.eds_config.CopyFrom(_ads_config_source())
    else:
        cluster.type = cluster_pb2.Cluster.STRICT_DNS
        cluster.load_assignment.CopyFrom(
            _load_assignment(name, challenge.upstream_host, challenge.upstream_port)
        )
    return cluster


def _placed(challenge: EdgeChallenge) -> bool:
    """Whether the challenge's public API has a known address (port 0: not yet)."""
    return bool(challenge.upstream_host) and challenge.upstream_port > 0


def _authz_cluster(settings: EdgeSettings) -> Any:
    cluster = cluster_pb2.Cluster(
        name=AUTHZ_CLUSTER,
        type=_discovery_type([settings.authz_host]),
        connect_timeout=_duration_ms(settings.connect_timeout_ms),
    )
    cluster.load_assignment.CopyFrom(
        _load_assignment(AUTHZ_CLUSTER, settings.authz_host, settings.authz_port)
    )
    options = http_protocol_options_pb2.HttpProtocolOptions()
    options.explicit_http_config.http2_protocol_options.SetInParent()
    _pack(cluster.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS_KEY], options)
    return cluster


def _discovery_type(hosts: Iterable[str]) -> int:
    """STATIC when every host is an IP literal, else STRICT_DNS."""
    if all(_is_ip(host) for host in hosts):
        return int(cluster_pb2.Cluster.STATIC)
    return int(cluster_pb2.Cluster.STRICT_DNS)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _load_assignment(name: str, host: str, port: int) -> Any:
    assignment = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    lb_endpoint = assignment.endpoints.add().lb_endpoints.add()
    lb_endpoint.endpoint.address.CopyFrom(_socket_address(host, port))
    return assignment


def _socket_address(host: str, port: int) -> Any:
    address = address_pb2.Address()
    address.socket_address.address = host
    address.socket_address.port_value = port
    return address


def _ads_config_source() -> Any:
    source = config_source_pb2.ConfigSource(resource_api_version=config_source_pb2.V3)
    source.ads.SetInParent()
    return source


# ---------------------------------------------------------------------------------------------
# Listener


def _listener(settings: EdgeSettings) -> Any:
    listener = listener_pb2.Listener(
        name=LISTENER_NAME, per_connection_buffer_limit_bytes=_u32(CONNECTION_BUFFER_BYTES)
    )
    listener.address.CopyFrom(_socket_address(settings.listen_host, settings.listen_port))
    chain = listener_components_pb2.FilterChain()
    network_filter = chain.filters.add(name=HCM_FILTER)
    _pack(network_filter.typed_config, _connection_manager(settings))
    if settings.tls_cert_file:
        chain.transport_socket.name = TLS_TRANSPORT_SOCKET
        _pack(chain.transport_socket.typed_config, _downstream_tls())
    listener.filter_chains.append(chain)
    return listener


def _downstream_tls() -> Any:
    tls = tls_pb2.DownstreamTlsContext()
    common = tls.common_tls_context
    common.tls_params.tls_minimum_protocol_version = tls_common_pb2.TlsParameters.TLSv1_2
    common.alpn_protocols.extend(TLS_ALPN)
    certificate = common.tls_certificate_sds_secret_configs.add(name=TLS_SECRET_NAME)
    certificate.sds_config.CopyFrom(_ads_config_source())
    return tls


def _tls_secret(settings: EdgeSettings) -> Any:
    """The listener's certificate as paths Envoy reads and watches (SDS)."""
    secret = secret_pb2.Secret(name=TLS_SECRET_NAME)
    # Envoy watches the files' directories (its default without watched_directory): a file
    # moved into one reloads the pair, as when the kubelet swaps a mounted Secret's ..data
    # symlink, though tls.crt itself never changes.
    secret.tls_certificate.certificate_chain.filename = settings.tls_cert_file
    secret.tls_certificate.private_key.filename = settings.tls_key_file
    return secret


def _connection_manager(settings: EdgeSettings) -> Any:
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=STAT_PREFIX,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        normalize_path=wrappers_pb2.BoolValue(value=True),
        merge_slashes=True,
        path_with_escaped_slashes_action=hcm_pb2.HttpConnectionManager.REJECT_REQUEST,
        use_remote_address=wrappers_pb2.BoolValue(value=True),
        # The client address (per-IP limits, access log, x-envoy-external-address) is the
        # TCP peer, or the entry of X-Forwarded-For this many hops from its end.
        xff_num_trusted_hops=settings.trusted_proxies,
    )
    hcm.rds.route_config_name = ROUTE_CONFIG_NAME
    hcm.rds.config_source.CopyFrom(_ads_config_source())
    hcm.request_headers_timeout.CopyFrom(_duration_ms(settings.request_headers_timeout_ms))
    common = hcm.common_http_protocol_options
    common.headers_with_underscores_action = protocol_pb2.HttpProtocolOptions.REJECT_REQUEST
    common.idle_timeout.CopyFrom(_duration_ms(settings.idle_timeout_ms))
    http2 = hcm.http2_protocol_options
    http2.max_concurrent_streams.value = HTTP2_MAX_CONCURRENT_STREAMS
    http2.initial_stream_window_size.value = HTTP2_STREAM_WINDOW_BYTES
    http2.initial_connection_window_size.value = HTTP2_CONNECTION_WINDOW_BYTES
    hcm.local_reply_config.CopyFrom(_local_reply_config())
    if settings.access_log != "off":
        access_log = hcm.access_log.add(name="envoy.access_loggers.stdout")
        _pack(
            access_log.typed_config,
            stream_pb2.StdoutAccessLog(log_format=_json_format(ACCESS_LOG_FORMAT)),
        )
        if settings.access_log == "errors":
            # Formatting a line per success is the largest single cost of the hot path;
            # refusals and upstream failures are what operators read.
            either = access_log.filter.or_filter
            status = either.filters.add().status_code_filter.comparison
            status.op = accesslog_pb2.ComparisonFilter.GE
            status.value.default_value = 400
            status.value.runtime_key = "edge.access_log.min_status"
            either.filters.add().response_flag_filter.SetInParent()
    for name, config in (
        (HEADER_MUTATION_FILTER, _header_mutation()),
        (RATE_LIMIT_IP_FILTER, _inert_rate_limit(RATE_LIMIT_IP_FILTER)),
        (BUFFER_FILTER, buffer_pb2.Buffer(max_request_bytes=_u32(LISTENER_BODY_LIMIT))),
        (EXT_AUTHZ_FILTER, _ext_authz(settings)),
        (RATE_LIMIT_HOTKEY_FILTER, _inert_rate_limit(RATE_LIMIT_HOTKEY_FILTER)),
        (ROUTER_FILTER, router_pb2.Router()),
    ):
        http_filter = hcm.http_filters.add(name=name)
        _pack(http_filter.typed_config, config)
    return hcm


def _header_mutation() -> Any:
    """Removes every header under the platform's prefix and every path override header: one
    regular expression over the request's header names, since the platform's names are
    open-ended (bench.edge_instructions: about what nine removals by name cost)."""
    mutation = header_mutation_pb2.HeaderMutation()
    remove = mutation.mutations.request_mutations.add().remove_on_match
    remove.key_matcher.safe_regex.regex = REMOVED_REQUEST_HEADERS_REGEX
    return mutation


def _inert_rate_limit(stat_prefix: str) -> Any:
    """Listener-level local rate limit: no bucket, not enabled; routes bring their own."""
    return local_rate_limit_pb2.LocalRateLimit(stat_prefix=stat_prefix)


def _ext_authz(settings: EdgeSettings) -> Any:
    authz = ext_authz_pb2.ExtAuthz(
        transport_api_version=config_source_pb2.V3,
        failure_mode_allow=False,
        status_on_error=http_status_pb2.HttpStatus(code=http_status_pb2.ServiceUnavailable),
        with_request_body=_authz_body(LISTENER_BODY_LIMIT),
    )
    authz.grpc_service.envoy_grpc.cluster_name = AUTHZ_CLUSTER
    authz.grpc_service.timeout.CopyFrom(_duration_ms(settings.authz_timeout_ms))
    if settings.edge_token:
        authz.grpc_service.initial_metadata.append(
            base_pb2.HeaderValue(key="authorization", value=f"Bearer {settings.edge_token}")
        )
    return authz


def _authz_body(max_bytes: int) -> Any:
    return ext_authz_pb2.BufferSettings(
        max_request_bytes=max_bytes, allow_partial_message=False, pack_as_bytes=True
    )


def _local_reply_config() -> Any:
    """JSON bodies for Envoy's own error replies, without internal details.

    The master's ext_authz denials (flagged UAEX) keep the body and status the master chose;
    only an unreachable master (UAEX with the 503 of ``status_on_error``) is rewritten.
    """
    config = hcm_pb2.LocalReplyConfig()

    def mapper(filter_: Any, body: Mapping[str, str] | None) -> None:
        entry = config.mappers.add()
        entry.filter.CopyFrom(filter_)
        if body is not None:
            entry.body_format_override.CopyFrom(_json_format(body))

    uaex = accesslog_pb2.AccessLogFilter(
        response_flag_filter=accesslog_pb2.ResponseFlagFilter(flags=["UAEX"])
    )
    authz_down = accesslog_pb2.AccessLogFilter()
    authz_down.and_filter.filters.extend([uaex, _status_filter(503)])
    mapper(authz_down, {"error": "authorization_unavailable"})
    mapper(uaex, None)
    # Envoy past its heap budget (the overload manager's stop_accepting_requests) answers
    # 503 with no response flag: say so, rather than blame the challenge.
    overloaded = accesslog_pb2.AccessLogFilter()
    overloaded.and_filter.filters.extend(
        [_status_filter(503), _response_code_details_filter(OVERLOAD_CODE_DETAILS)]
    )
    mapper(overloaded, {"error": "edge_overloaded"})
    # An upgrade (WebSocket) or an HTTP/1.1 CONNECT: the edge carries neither, and Envoy
    # answers 403 with no body; the edge's own 403s keep theirs. (An h2c upgrade Envoy
    # ignores: the request is answered over HTTP/1.1.)
    upgrade = accesslog_pb2.AccessLogFilter()
    upgrade.and_filter.filters.extend(
        [_status_filter(403), _response_code_details_filter(UPGRADE_FAILED_CODE_DETAILS)]
    )
    mapper(upgrade, {"error": "upgrade_not_supported"})
    upstream_failed = accesslog_pb2.AccessLogFilter()
    upstream_failed.or_filter.filters.extend(_status_filter(code) for code in (502, 503, 504))
    mapper(upstream_failed, {"error": "challenge_unavailable"})
    mapper(_status_filter(429), {"error": "rate_limited"})
    mapper(_status_filter(413), {"error": "payload_too_large"})
    mapper(_status_filter(408), {"error": "request_timeout"})
    mapper(_status_filter(400), {"error": "bad_request"})
    # Envoy's own refusals: a request-target that is not a path (OPTIONS *), HTTP/1.0, an
    # unknown transfer encoding.
    mapper(_status_filter(404), {"error": "not_found"})
    mapper(_status_filter(426), {"error": "upgrade_required"})
    mapper(_status_filter(501), {"error": "not_implemented"})
    return config


def _response_code_details_filter(details: str) -> Any:
    """Matches a reply whose response code details (Envoy's reason for it) are ``details``;
    a CEL expression, the one access log filter that can read them."""
    match = accesslog_pb2.AccessLogFilter()
    match.extension_filter.name = CEL_FILTER
    _pack(
        match.extension_filter.typed_config,
        cel_pb2.ExpressionFilter(expression=f"response.code_details == {details!r}"),
    )
    return match


def _status_filter(code: int) -> Any:
    status = accesslog_pb2.AccessLogFilter()
    comparison = status.status_code_filter.comparison
    comparison.op = accesslog_pb2.ComparisonFilter.EQ
    comparison.value.default_value = code
    comparison.value.runtime_key = f"edge.local_reply.status_{code}"
    return status


# ---------------------------------------------------------------------------------------------
# Routes


def _route_configuration(challenges: list[EdgeChallenge], settings: EdgeSettings) -> Any:
    config = route_pb2.RouteConfiguration(name=ROUTE_CONFIG_NAME)
    vhost = config.virtual_hosts.add(name=VIRTUAL_HOST_NAME, domains=["*"])
    _set_filter_config(vhost, BUFFER_FILTER, buffer_pb2.BufferPerRoute(disabled=True))
    for name in (EXT_AUTHZ_FILTER, RATE_LIMIT_IP_FILTER, RATE_LIMIT_HOTKEY_FILTER):
        # Generic disabling: the filter is not even created for a request routed here (for
        # ext_authz that saves about 18,000 instructions per unsigned request, where its own
        # ExtAuthzPerRoute(disabled) created it and let it step aside). A route's own config
        # of the filter (ExtAuthzPerRoute, LocalRateLimit) re-enables it there.
        _set_filter_config(vhost, name, route_components_pb2.FilterConfig(disabled=True))

    non_canonical = vhost.routes.add(name="non_canonical_path")
    non_canonical.match.safe_regex.regex = NON_CANONICAL_PATH_REGEX
    _direct(non_canonical, 400, {"error": "bad_request"})
    for challenge in challenges:
        vhost.routes.extend(_challenge_routes(challenge, settings))
    not_found = vhost.routes.add(name="not_found")
    not_found.match.prefix = "/"
    _direct(not_found, 404, {"error": "not_found"})
    # HTTP/1.1 CONNECT (a tunnel) matches no path route. Without a route the listener's buffer
    # filter would wait for the end of the tunnel before anything answered, holding the
    # connection open with no reply. Matched here, Envoy refuses the tunnel at once (403
    # upgrade_failed, since no route allows CONNECT); the 404 is what is left if it did not.
    connect = vhost.routes.add(name="connect")
    connect.match.connect_matcher.SetInParent()
    _direct(connect, 404, {"error": "not_found"})
    return config


def _challenge_routes(challenge: EdgeChallenge, settings: EdgeSettings) -> list[Any]:
    slug = challenge.slug
    root = f"{PUBLIC_PREFIX}{slug}"
    routes: list[Any] = []

    # The challenge's own public prefix under itself, too: a server that cuts that prefix off
    # itself (FastAPI's root_path) would route /challenges/{slug}/challenges/{slug}/internal,
    # which reaches it as /challenges/{slug}/internal, to /internal.
    blocked = _ordered_prefixes((*BUILTIN_BLOCKED_PREFIXES, root, *challenge.blocked_path_prefixes))
    for prefix in blocked:
        for match_name, match in _prefix_matches(root, prefix):
            route = route_components_pb2.Route(name=f"{slug}:blocked:{match_name}")
            route.match.CopyFrom(match)
            _direct(route, 403, {"error": "forbidden", "reason": "internal_route"})
            routes.append(route)
        if not prefix:
            # The whole challenge is blocked: nothing after this can match.
            return routes

    limits = challenge.limits
    for prefix in _ordered_prefixes(challenge.signed_path_prefixes):
        for match_name, match in _prefix_matches(root, prefix):
            route = _forward(challenge, f"{slug}:signed:{match_name}", match)
            authz = ext_authz_pb2.ExtAuthzPerRoute()
            authz.check_settings.context_extensions["slug"] = slug
            authz.check_settings.with_request_body.CopyFrom(
                _authz_body(limits.max_request_body_bytes)
            )
            _set_filter_config(route, EXT_AUTHZ_FILTER, authz)
            _set_filter_config(
                route,
                RATE_LIMIT_IP_FILTER,
                _ip_rate_limit(settings.authz_rate_per_ip_per_minute, settings),
            )
            hotkey_action = route_components_pb2.RateLimit.Action()
            hotkey_action.request_headers.header_name = VERIFIED_HOTKEY_HEADER
            hotkey_action.request_headers.descriptor_key = HOTKEY_DESCRIPTOR_KEY
            _set_filter_config(
                route,
                RATE_LIMIT_HOTKEY_FILTER,
                _keyed_rate_limit(
                    RATE_LIMIT_HOTKEY_FILTER,
                    limits.rate_per_hotkey_per_minute,
                    hotkey_action,
                    HOTKEY_DESCRIPTOR_KEY,
                    settings.max_rate_limit_keys,
                ),
            )
            routes.append(route)
        if not prefix:
            return routes

    public = _forward(challenge, f"{slug}:public", _segment_match(root))
    _set_filter_config(public, BUFFER_FILTER, _buffer_per_route(limits.max_request_body_bytes))
    _set_filter_config(
        public, RATE_LIMIT_IP_FILTER, _ip_rate_limit(limits.rate_per_ip_per_minute, settings)
    )
    routes.append(public)
    return routes


def _ip_rate_limit(per_minute: int, settings: EdgeSettings) -> Any:
    """``per_minute`` per client address (one bucket per address, LRU-bounded)."""
    action = route_components_pb2.RateLimit.Action()
    action.remote_address.SetInParent()
    return _keyed_rate_limit(
        RATE_LIMIT_IP_FILTER, per_minute, action, IP_DESCRIPTOR_KEY, settings.max_rate_limit_keys
    )


def _ordered_prefixes(prefixes: Iterable[str]) -> list[str]:
    """Distinct prefixes without a trailing slash ("" is the challenge root), longest first.

    Matching is case-insensitive, so prefixes differing in case only are one prefix.
    """
    seen: dict[str, str] = {}
    for raw in prefixes:
        prefix = "/" + raw.strip("/") if raw.strip("/") else ""
        seen.setdefault(prefix.lower(), prefix)
    return sorted(seen.values(), key=lambda p: (-len(p), p.lower(), p))


def _prefix_matches(root: str, prefix: str) -> list[tuple[str, Any]]:
    """Route matches for ``prefix`` under ``root``, each named: the whole segment, and the
    continuations a lenient server folds into it (none for the challenge root)."""
    matches = [(prefix or "/", _segment_match(root + prefix))]
    if prefix:
        for continuation in SEGMENT_CONTINUATIONS:
            sibling = route_components_pb2.RouteMatch(prefix=root + prefix + continuation)
            sibling.case_sensitive.value = False
            matches.append((prefix + continuation, sibling))
    return matches


def _segment_match(path: str) -> Any:
    """``path`` and everything below it, by whole segment, case-insensitively."""
    match = route_components_pb2.RouteMatch(path_separated_prefix=path)
    match.case_sensitive.value = False
    return match


def _forward(challenge: EdgeChallenge, name: str, match: Any) -> Any:
    """A route to the challenge's cluster with ``/challenges/{slug}`` cut off the path."""
    route = route_components_pb2.Route(name=name)
    route.match.CopyFrom(match)
    action = route.route
    action.cluster = cluster_name(challenge.slug)
    action.timeout.CopyFrom(duration_pb2.Duration(seconds=challenge.limits.request_timeout_seconds))
    action.regex_rewrite.pattern.regex = f"(?i)^{re.escape(PUBLIC_PREFIX + challenge.slug)}/?"
    action.regex_rewrite.substitution = "/"
    return route


def _buffer_per_route(max_bytes: int) -> Any:
    per_route = buffer_pb2.BufferPerRoute()
    per_route.buffer.max_request_bytes.value = max_bytes
    return per_route


def _keyed_rate_limit(
    stat_prefix: str, per_minute: int, action: Any, descriptor_key: str, max_keys: int
) -> Any:
    """A local rate limit with one token bucket per distinct descriptor value (LRU-bounded)."""
    bucket, retry_after = _token_bucket(per_minute)
    config = local_rate_limit_pb2.LocalRateLimit(
        stat_prefix=stat_prefix,
        token_bucket=bucket,
        filter_enabled=_always(f"edge.{stat_prefix}.enabled"),
        filter_enforced=_always(f"edge.{stat_prefix}.enforced"),
        enable_x_ratelimit_headers=ratelimit_pb2.DRAFT_VERSION_03,
        always_consume_default_token_bucket=wrappers_pb2.BoolValue(value=False),
        max_dynamic_descriptors=_u32(max_keys),
    )
    config.rate_limits.add().actions.append(action)
    descriptor = config.descriptors.add()
    descriptor.entries.add(key=descriptor_key, value="")
    descriptor.token_bucket.CopyFrom(bucket)
    header = config.response_headers_to_add.add()
    header.header.key = "retry-after"
    header.header.value = str(retry_after)
    header.append_action = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    return config


def _token_bucket(per_minute: int) -> tuple[Any, int]:
    """N per minute as a bucket of N tokens refilled evenly; and the refill wait in seconds."""
    if per_minute <= 0:
        raise ValueError("rate limits must be positive")
    tokens_per_fill = max(1, math.ceil(per_minute * MIN_FILL_INTERVAL_MS / 60_000))
    fill_ms = max(MIN_FILL_INTERVAL_MS, math.ceil(60_000 * tokens_per_fill / per_minute))
    bucket = token_bucket_pb2.TokenBucket(
        max_tokens=per_minute,
        tokens_per_fill=_u32(tokens_per_fill),
        fill_interval=_duration_ms(fill_ms),
    )
    return bucket, max(1, math.ceil(fill_ms / 1000))


def _always(runtime_key: str) -> Any:
    fraction = base_pb2.RuntimeFractionalPercent(runtime_key=runtime_key)
    fraction.default_value.numerator = 100
    fraction.default_value.denominator = percent_pb2.FractionalPercent.HUNDRED
    return fraction


def _direct(route: Any, status: int, body: Mapping[str, str]) -> None:
    route.direct_response.status = status
    route.direct_response.body_format.CopyFrom(_json_format(body))


def _set_filter_config(target: Any, name: str, config: Any) -> None:
    _pack(target.typed_per_filter_config[name], config)


def _pack(target: Any, message: Any) -> None:
    """Pack ``message`` into the ``Any`` ``target`` with deterministic bytes.

    ``Any.Pack`` serializes non-deterministically by default, and map fields (Struct bodies,
    context extensions) would then be ordered differently from one process to the next.
    """
    target.Pack(message, deterministic=True)


# ---------------------------------------------------------------------------------------------
# Small builders


def _json_format(fields: Mapping[str, str]) -> Any:
    structure = struct_pb2.Struct()
    structure.update(dict(fields))
    return substitution_format_string_pb2.SubstitutionFormatString(json_format=structure)


def _duration_ms(milliseconds: int) -> Any:
    duration = duration_pb2.Duration()
    duration.FromMilliseconds(milliseconds)
    return duration


def _u32(value: int) -> Any:
    return wrappers_pb2.UInt32Value(value=value)
