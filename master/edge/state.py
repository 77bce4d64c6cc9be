"""From the registry and the placement of public APIs to the edge's input state.

Pure: the controller (``master.edge.controller``) feeds it the registry
snapshot and where each challenge's public API listens.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from master.edge.model import EdgeChallenge, EdgeLimits, EdgeSettings, EdgeState
from master.registry.rules import Challenge, Status
from platform_common.config import parse_host_port


def build_state(
    challenges: Iterable[Challenge],
    public_addresses: Mapping[str, str],
    settings: EdgeSettings,
    defaults: EdgeLimits,
) -> EdgeState:
    """The edge state: ACTIVE challenges that expose a public API, in slug order.

    A challenge whose public API has no known address yet keeps its routes and
    gets an upstream with no endpoint (port 0), so miners get the safe 503
    rather than a 404 that would suggest the challenge does not exist.
    """
    out = []
    for challenge in sorted(challenges, key=lambda c: c.slug):
        routes = challenge.spec.routes
        if challenge.status is not Status.ACTIVE or routes.public_port == 0:
            continue
        host, port = "", 0
        address = public_addresses.get(challenge.slug)
        if address:
            host, port = parse_host_port(address, challenge.slug)
        out.append(
            EdgeChallenge(
                slug=challenge.slug,
                upstream_host=host,
                upstream_port=port,
                limits=EdgeLimits(
                    rate_per_hotkey_per_minute=routes.rate_limit_per_hotkey_per_minute
                    or defaults.rate_per_hotkey_per_minute,
                    rate_per_ip_per_minute=routes.rate_limit_per_ip_per_minute
                    or defaults.rate_per_ip_per_minute,
                    max_request_body_bytes=routes.max_request_body_bytes
                    or defaults.max_request_body_bytes,
                    request_timeout_seconds=routes.request_timeout_seconds
                    or defaults.request_timeout_seconds,
                ),
                blocked_path_prefixes=tuple(routes.blocked_path_prefixes),
                signed_path_prefixes=tuple(routes.signed_path_prefixes),
            )
        )
    return EdgeState(settings=settings, challenges=tuple(out))
