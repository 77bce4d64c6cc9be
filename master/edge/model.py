"""What the edge translator reads and writes: plain, immutable values.

The translator (``master.edge.translate``) turns an :class:`EdgeState` into
:class:`EdgeResources`; the xDS server (``master.edge.xds``) serves those; the
composition root builds :class:`EdgeState` from the registry and the placement
of each challenge's public endpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Headers only the platform may set: the whole x-platform- prefix is the platform's, and
# every header under it is stripped from each inbound request before any other filter runs;
# the verified identity ones are then set by ext_authz.
PLATFORM_HEADER_PREFIX = "x-platform-"
VERIFIED_HOTKEY_HEADER = "x-platform-verified-hotkey"
VERIFIED_UID_HEADER = "x-platform-verified-uid"

# Request headers some frameworks and servers take as the real path, or as a prefix of it
# (IIS URL Rewrite, Symfony and Zend behind trusted proxies, nginx auth_request set-ups;
# X-Forwarded-Prefix: Spring's ForwardedHeaderFilter, ASP.NET Core, Werkzeug's ProxyFix):
# removed from every inbound request too, so a public route cannot carry an internal path to
# the challenge in a header.
PATH_OVERRIDE_HEADERS = (
    "x-original-url",
    "x-original-uri",
    "x-original-path",
    "x-rewrite-url",
    "x-override-url",
    "x-request-uri",
    "x-forwarded-prefix",
    "x-forwarded-uri",
    "x-forwarded-path",
)

# Paths refused at the edge for every challenge, in addition to its own list.
BUILTIN_BLOCKED_PREFIXES = ("/internal", "/health", "/version")

# Public path scheme: /challenges/{slug}/... is rewritten to /... upstream.
PUBLIC_PREFIX = "/challenges/"

# Names of the resources the translator emits (stable: Envoy and tests rely on them).
LISTENER_NAME = "edge_http"
ROUTE_CONFIG_NAME = "edge_routes"
AUTHZ_CLUSTER = "platform_authz"
# Prefix of the listener's HTTP statistics (``http.edge.downstream_rq_active``, ...).
STAT_PREFIX = "edge"


def cluster_name(slug: str) -> str:
    return f"challenge_{slug}"


@dataclass(frozen=True)
class EdgeLimits:
    """Per-challenge limits with the platform defaults already applied (all > 0)."""

    rate_per_hotkey_per_minute: int
    rate_per_ip_per_minute: int
    max_request_body_bytes: int
    request_timeout_seconds: int


@dataclass(frozen=True)
class EdgeChallenge:
    """One ACTIVE challenge with a public API and a known public endpoint."""

    slug: str
    upstream_host: str
    upstream_port: int
    limits: EdgeLimits
    # Relative to the challenge root, start with "/", matched by whole segment,
    # case-insensitively. Built-in prefixes are not repeated here.
    blocked_path_prefixes: tuple[str, ...] = ()
    # "/" means every route of the challenge needs a signed request.
    signed_path_prefixes: tuple[str, ...] = ()


# Envoy's process-wide limits, in its bootstrap (overload manager): Envoy's edge
# recommendations, with a heap budget that fits a small host. The heap floor keeps a typo
# from starving Envoy at start.
DEFAULT_MAX_CONNECTIONS = 50_000
DEFAULT_MAX_HEAP_BYTES = 1024 * 1024 * 1024
MIN_HEAP_BYTES = 64 * 1024 * 1024


def bootstrap_limit_problem(
    *, max_connections: object, max_heap_bytes: object
) -> tuple[str, str] | None:
    """The first of the bootstrap's process-wide limits out of range, as (parameter name,
    the rule it breaks, with the value); None when both hold. Callers name their own flag."""
    limits: tuple[tuple[str, object, int, str], ...] = (
        ("max_connections", max_connections, 1, ""),
        ("max_heap_bytes", max_heap_bytes, MIN_HEAP_BYTES, f" ({MIN_HEAP_BYTES >> 20} MiB)"),
    )
    for name, limit, least, unit in limits:
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < least:
            return name, f"must be an integer of at least {least}{unit}; got {limit!r}"
    return None


@dataclass(frozen=True)
class EdgeSettings:
    """Deployment-wide settings of the edge (from the master's configuration)."""

    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    # Where Envoy reaches the master's gRPC server for ext_authz.
    authz_host: str = "127.0.0.1"
    authz_port: int = 50051
    # Bearer token Envoy presents to the master (xDS and ext_authz).
    edge_token: str = ""
    authz_timeout_ms: int = 1000
    # Requests per minute per client address on each signed route, refused at the edge
    # before Envoy asks the master: a flood of forged signatures costs the master nothing.
    authz_rate_per_ip_per_minute: int = 6000
    # Upper bound on distinct client addresses / hotkeys tracked per route.
    max_rate_limit_keys: int = 20000
    connect_timeout_ms: int = 1000
    # Envoy's access log on stdout: "errors" (status >= 400 or a response flag, i.e.
    # every refusal and upstream failure), "all", or "off".
    access_log: str = "errors"
    # Proxies in front of Envoy that append the client's address to X-Forwarded-For (a cloud
    # load balancer: 1). 0 takes the TCP peer, and ignores the header, as a direct edge must.
    trusted_proxies: int = 0
    # Connection hygiene of a public listener (Envoy's own edge recommendations). A client
    # must finish its request headers this long after it starts them (slow-header clients
    # get 408 and the connection is closed); a connection with no request in flight is
    # closed after idle_timeout_ms.
    request_headers_timeout_ms: int = 10_000
    idle_timeout_ms: int = 300_000
    # HTTPS on the public listener: a PEM certificate chain and its private key, as paths on
    # Envoy's filesystem (absolute); both empty: plain HTTP (a load balancer in front ends
    # TLS, or a local run).
    tls_cert_file: str = ""
    tls_key_file: str = ""


@dataclass(frozen=True)
class EdgeState:
    """Input of the translator: everything the edge config depends on."""

    settings: EdgeSettings
    # Sorted by slug by whoever builds it; the translator sorts again anyway.
    challenges: tuple[EdgeChallenge, ...] = ()


@dataclass(frozen=True)
class EdgeResources:
    """Output of the translator: protobuf messages, by xDS resource type.

    Each tuple holds messages of one type (``Cluster``,
    ``ClusterLoadAssignment``, ``Listener``, ``RouteConfiguration``, TLS ``Secret``),
    sorted by name, so equal states give byte-identical resources.
    """

    clusters: tuple[Any, ...] = field(default=())
    endpoints: tuple[Any, ...] = field(default=())
    listeners: tuple[Any, ...] = field(default=())
    routes: tuple[Any, ...] = field(default=())
    secrets: tuple[Any, ...] = field(default=())
