"""The edge translator: golden output, determinism, and Envoy's own verdict on the result.

The xDS server versions the edge config by hashing the translator's output, so the output
must be byte-stable; the golden files pin it (reviewable diffs when the edge changes on
purpose), and ``envoy --mode validate`` proves that what is pinned is a config Envoy 1.40
accepts, not merely well-formed protobuf.

Regenerate the golden files with ``PLATFORM_REGEN_GOLDEN=1``: the tests then rewrite them and
fail, so a regeneration never passes silently.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import protocol_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import json_format

from master.edge.model import (
    AUTHZ_CLUSTER,
    LISTENER_NAME,
    ROUTE_CONFIG_NAME,
    EdgeChallenge,
    EdgeLimits,
    EdgeResources,
    EdgeSettings,
    EdgeState,
    cluster_name,
)
from master.edge.translate import static_bootstrap, translate
from tests.edge.envoy_support import self_signed_certificate, validate
from tests.support.ports import free_port

GOLDEN = Path(__file__).parent / "golden"
REGEN_ENV = "PLATFORM_REGEN_GOLDEN"
KINDS = ("clusters", "endpoints", "listeners", "routes", "secrets")

DEFAULT_LIMITS = EdgeLimits(
    rate_per_hotkey_per_minute=60,
    rate_per_ip_per_minute=120,
    max_request_body_bytes=1_048_576,
    request_timeout_seconds=30,
)
CUSTOM_LIMITS = EdgeLimits(
    rate_per_hotkey_per_minute=5000,
    rate_per_ip_per_minute=7,
    max_request_body_bytes=65_536,
    request_timeout_seconds=300,
)
LONGEST_SLUG = "s" + "-0123456789abcdef" * 2 + "-abcd"  # 40 characters, the maximum

CASES: dict[str, EdgeState] = {
    "empty": EdgeState(settings=EdgeSettings()),
    # ACTIVE with a public port, but no instance placed yet: routed to no endpoint.
    "unplaced": EdgeState(
        settings=EdgeSettings(),
        challenges=(EdgeChallenge("pending", "", 0, DEFAULT_LIMITS),),
    ),
    # HTTPS: the listener names its certificate, a secret that holds the two paths.
    "https": EdgeState(
        settings=EdgeSettings(
            listen_host="0.0.0.0",
            listen_port=8443,
            tls_cert_file="/etc/platform-edge-tls/tls.crt",
            tls_key_file="/etc/platform-edge-tls/tls.key",
        ),
        challenges=(EdgeChallenge("echo", "10.0.0.5", 8000, DEFAULT_LIMITS),),
    ),
    "unsigned_defaults": EdgeState(
        settings=EdgeSettings(),
        challenges=(EdgeChallenge("echo", "10.0.0.5", 8000, DEFAULT_LIMITS),),
    ),
    "signed_root_custom_blocked": EdgeState(
        settings=EdgeSettings(edge_token="golden-token"),
        challenges=(
            EdgeChallenge(
                "vault",
                "10.0.0.6",
                9000,
                DEFAULT_LIMITS,
                blocked_path_prefixes=("/admin", "/Debug/", "/metrics", "/ADMIN"),
                signed_path_prefixes=("/",),
            ),
        ),
    ),
    "signed_subpaths_custom_limits": EdgeState(
        settings=EdgeSettings(edge_token="golden-token"),
        challenges=(
            EdgeChallenge(
                "arena",
                "10.0.1.7",
                8080,
                CUSTOM_LIMITS,
                blocked_path_prefixes=("/ops",),
                signed_path_prefixes=("/api", "/v1/answers", "/api/submit"),
            ),
        ),
    ),
    "several_with_hostnames": EdgeState(
        settings=EdgeSettings(
            listen_host="0.0.0.0",
            listen_port=10000,
            authz_host="platform-master.platform.svc.cluster.local",
            authz_port=50051,
            edge_token="golden-token",
            authz_timeout_ms=250,
            max_rate_limit_keys=50_000,
            connect_timeout_ms=500,
            trusted_proxies=1,
        ),
        # Deliberately not in slug order.
        challenges=(
            EdgeChallenge(
                "zeta",
                "challenge-zeta.challenges.svc.cluster.local",
                8000,
                DEFAULT_LIMITS,
                signed_path_prefixes=("/submit",),
            ),
            EdgeChallenge(LONGEST_SLUG, "fd00::17", 8001, CUSTOM_LIMITS),
            EdgeChallenge(
                "alpha",
                "challenge-alpha.challenges.svc.cluster.local",
                8000,
                DEFAULT_LIMITS,
                blocked_path_prefixes=("/metrics",),
            ),
            EdgeChallenge("mid", "10.0.2.9", 8002, DEFAULT_LIMITS),
        ),
    ),
}


def render(resources: EdgeResources) -> str:
    """The golden form: per resource type, each message as MessageToJson with sorted keys."""
    document = {
        kind: [
            json.loads(
                json_format.MessageToJson(message, sort_keys=True, preserving_proto_field_name=True)
            )
            for message in getattr(resources, kind)
        ]
        for kind in KINDS
    }
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def serialized(resources: EdgeResources) -> bytes:
    return b"".join(
        message.SerializeToString(deterministic=True)
        for kind in KINDS
        for message in getattr(resources, kind)
    )


def bootstrap_of(state: EdgeState) -> dict[str, Any]:
    return static_bootstrap(translate(state), admin_host="127.0.0.1", admin_port=free_port())


def routes_of(state: EdgeState) -> list[Any]:
    (config,) = translate(state).routes
    (vhost,) = config.virtual_hosts
    return list(vhost.routes)


def hcm_of(resources: EdgeResources) -> Any:
    (listener,) = resources.listeners
    hcm = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    return hcm


# ---------------------------------------------------------------------------------------------
# Golden files and determinism


@pytest.mark.parametrize("case", sorted(CASES))
def test_translation_matches_golden_file(case: str) -> None:
    text = render(translate(CASES[case]))
    path = GOLDEN / f"{case}.json"
    if os.environ.get(REGEN_ENV) == "1":
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text)
        pytest.fail(f"regenerated {path.name}; review the diff, unset {REGEN_ENV} and rerun")
    assert path.exists(), f"no golden file {path.name}; run once with {REGEN_ENV}=1"
    assert text == path.read_text(), f"{path.name} differs; if intended, regenerate"


def test_every_golden_file_belongs_to_a_case() -> None:
    assert sorted(p.stem for p in GOLDEN.glob("*.json")) == sorted(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_translation_is_deterministic(case: str) -> None:
    state = CASES[case]
    shuffled = EdgeState(state.settings, tuple(reversed(state.challenges)))
    first, second, third = translate(state), translate(state), translate(shuffled)
    assert serialized(first) == serialized(second) == serialized(third)
    assert render(first) == render(third)


def test_translation_is_identical_across_processes() -> None:
    """Hash randomization or dict order must not leak into the bytes a version is hashed from."""
    case = "several_with_hostnames"
    here = hashlib.sha256(serialized(translate(CASES[case]))).hexdigest()
    script = (
        "import hashlib\n"
        "from tests.edge.test_translate import CASES, serialized\n"
        "from master.edge.translate import translate\n"
        f"print(hashlib.sha256(serialized(translate(CASES[{case!r}]))).hexdigest())\n"
    )
    project = Path(__file__).resolve().parents[2]
    for seed in ("1", "2"):
        result = subprocess.run(
            [sys.executable, "-c", script],
            cwd=project,
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        assert result.stdout.strip() == here


# ---------------------------------------------------------------------------------------------
# Envoy's verdict


@pytest.mark.parametrize("case", sorted(CASES))
def test_static_bootstrap_passes_envoy_validate(case: str, tmp_path: Path) -> None:
    state = CASES[case]
    if state.settings.tls_cert_file:
        # Envoy loads the certificate to validate: a real one stands in for the case's paths.
        cert, key = self_signed_certificate(tmp_path)
        settings = dataclasses.replace(
            state.settings, tls_cert_file=str(cert), tls_key_file=str(key)
        )
        state = dataclasses.replace(state, settings=settings)
    result = validate(bootstrap_of(state), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def _public_route(routes: dict[str, Any]) -> dict[str, Any]:
    return next(r for r in routes["virtual_hosts"][0]["routes"] if r["name"] == "echo:public")


def _route_config(bootstrap: dict[str, Any]) -> dict[str, Any]:
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    config: dict[str, Any] = hcm["typed_config"]["route_config"]
    return config


def test_validate_rejects_a_broken_regex(tmp_path: Path) -> None:
    bootstrap = bootstrap_of(CASES["unsigned_defaults"])
    _public_route(_route_config(bootstrap))["route"]["regex_rewrite"]["pattern"]["regex"] = "(("
    result = validate(bootstrap, tmp_path)
    assert result.returncode != 0
    assert "missing )" in result.stdout + result.stderr


def test_validate_rejects_a_per_route_rate_limit_without_bucket(tmp_path: Path) -> None:
    bootstrap = bootstrap_of(CASES["unsigned_defaults"])
    limit = _public_route(_route_config(bootstrap))["typed_per_filter_config"]["rate_limit_ip"]
    del limit["token_bucket"]
    result = validate(bootstrap, tmp_path)
    assert result.returncode != 0
    assert "token bucket must be set" in result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# Structure worth stating outright (the golden files hold the rest)


def test_filter_chain_order_and_connection_manager_safety() -> None:
    hcm = hcm_of(translate(CASES["unsigned_defaults"]))
    assert [f.name for f in hcm.http_filters] == [
        "envoy.filters.http.header_mutation",
        "rate_limit_ip",
        "envoy.filters.http.buffer",
        "envoy.filters.http.ext_authz",
        "rate_limit_hotkey",
        "envoy.filters.http.router",
    ]
    assert hcm.normalize_path.value
    assert hcm.merge_slashes
    assert hcm.use_remote_address.value
    assert hcm.common_http_protocol_options.headers_with_underscores_action == (
        protocol_pb2.HttpProtocolOptions.REJECT_REQUEST
    )
    assert hcm.path_with_escaped_slashes_action == hcm_pb2.HttpConnectionManager.REJECT_REQUEST
    assert hcm.rds.route_config_name == ROUTE_CONFIG_NAME
    assert hcm.rds.config_source.HasField("ads")


def test_empty_registry_has_only_the_authz_cluster_and_catch_alls() -> None:
    resources = translate(CASES["empty"])
    assert [c.name for c in resources.clusters] == [AUTHZ_CLUSTER]
    assert resources.endpoints == ()
    assert [listener.name for listener in resources.listeners] == [LISTENER_NAME]
    assert [r.name for r in routes_of(CASES["empty"])] == [
        "non_canonical_path",
        "not_found",
        "connect",
    ]


def test_clusters_by_upstream_kind() -> None:
    state = CASES["several_with_hostnames"]
    resources = translate(state)
    clusters = {c.name: c for c in resources.clusters}
    assert list(clusters) == sorted(clusters)
    assert clusters[cluster_name("mid")].type == cluster_pb2.Cluster.EDS
    assert clusters[cluster_name(LONGEST_SLUG)].type == cluster_pb2.Cluster.EDS
    assert clusters[cluster_name("alpha")].type == cluster_pb2.Cluster.STRICT_DNS
    assert clusters[cluster_name("alpha")].load_assignment.cluster_name == cluster_name("alpha")
    # EDS carries IP endpoints only; hostnames are resolved by their STRICT_DNS cluster.
    assert [e.cluster_name for e in resources.endpoints] == sorted(
        [cluster_name("mid"), cluster_name(LONGEST_SLUG)]
    )
    authz = clusters[AUTHZ_CLUSTER]
    assert authz.type == cluster_pb2.Cluster.STRICT_DNS
    options = http_protocol_options_pb2.HttpProtocolOptions()
    authz.typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ].Unpack(options)
    assert options.explicit_http_config.HasField("http2_protocol_options")
    ip_authz = translate(CASES["empty"]).clusters[0]
    assert ip_authz.type == cluster_pb2.Cluster.STATIC


@pytest.mark.parametrize("mode", ["errors", "all", "off"])
def test_access_log_modes(mode: str) -> None:
    state = dataclasses.replace(
        CASES["unsigned_defaults"],
        settings=dataclasses.replace(EdgeSettings(), access_log=mode),
    )
    hcm = hcm_pb2.HttpConnectionManager()
    translate(state).listeners[0].filter_chains[0].filters[0].typed_config.Unpack(hcm)
    if mode == "off":
        assert list(hcm.access_log) == []
        return
    [log] = hcm.access_log
    if mode == "all":
        assert not log.HasField("filter")
    else:
        status, flags = log.filter.or_filter.filters
        assert status.status_code_filter.comparison.value.default_value == 400
        assert flags.HasField("response_flag_filter")


def test_an_unknown_access_log_mode_is_refused() -> None:
    state = dataclasses.replace(
        CASES["empty"], settings=dataclasses.replace(EdgeSettings(), access_log="some")
    )
    with pytest.raises(ValueError, match="access_log"):
        translate(state)


def test_an_unplaced_challenge_is_routed_to_a_cluster_without_endpoints() -> None:
    resources = translate(CASES["unplaced"])
    cluster = {c.name: c for c in resources.clusters}[cluster_name("pending")]
    assert cluster.type == cluster_pb2.Cluster.EDS
    assert [(e.cluster_name, len(e.endpoints)) for e in resources.endpoints] == [
        (cluster_name("pending"), 0)
    ]


def test_route_order_blocked_then_signed_then_public() -> None:
    names = [r.name for r in routes_of(CASES["signed_subpaths_custom_limits"])]
    kinds = [name.split(":")[1] for name in names if name.startswith("arena:")]
    assert kinds == sorted(kinds, key=["blocked", "signed", "public"].index)
    assert names[0] == "non_canonical_path"
    assert names[-2:] == ["not_found", "connect"]
    signed = [name for name in names if name.startswith("arena:signed:")]
    assert signed[0] == "arena:signed:/api/submit"
    assert "arena:signed:/api;" in signed
    assert "arena:blocked:/internal%" in names


def test_signed_root_leaves_no_public_route_and_dedupes_blocked_prefixes() -> None:
    names = [r.name for r in routes_of(CASES["signed_root_custom_blocked"])]
    assert "vault:public" not in names
    assert "vault:signed:/" in names
    assert names.count("vault:blocked:/admin") == 1
    assert "vault:blocked:/Debug" in names


def test_filters_off_by_default_are_off_by_envoys_generic_switch() -> None:
    # FilterConfig(disabled) keeps Envoy from creating the filter for a request at all; a
    # filter's own "disabled" field (ExtAuthzPerRoute) would create it on every unsigned
    # request only to step aside (about 18,000 instructions: docs/performance.md).
    (config,) = translate(CASES["signed_subpaths_custom_limits"]).routes
    (host,) = config.virtual_hosts
    for name in ("envoy.filters.http.ext_authz", "rate_limit_ip", "rate_limit_hotkey"):
        switch = route_components_pb2.FilterConfig()
        assert host.typed_per_filter_config[name].Unpack(switch), name
        assert switch.disabled, name
    # Signed routes turn ext_authz back on with its own config.
    signed = [r for r in config.virtual_hosts[0].routes if ":signed:" in r.name]
    assert signed
    for route in signed:
        authz = ext_authz_pb2.ExtAuthzPerRoute()
        assert route.typed_per_filter_config["envoy.filters.http.ext_authz"].Unpack(authz)
        assert authz.check_settings.context_extensions["slug"] == "arena"


@pytest.mark.parametrize(
    ("per_minute", "tokens_per_fill", "fill_ms", "retry_after"),
    [(1, 1, 60_000, 60), (3, 1, 20_000, 20), (7, 1, 8_572, 9), (60, 1, 1_000, 1),
     (1200, 1, 50, 1), (5000, 5, 60, 1)],
)  # fmt: skip
def test_rate_limit_buckets(
    per_minute: int, tokens_per_fill: int, fill_ms: int, retry_after: int
) -> None:
    limits = EdgeLimits(per_minute, per_minute, 1024, 10)
    state = EdgeState(EdgeSettings(), (EdgeChallenge("echo", "10.0.0.5", 80, limits),))
    (public,) = [r for r in routes_of(state) if r.name == "echo:public"]
    config = local_rate_limit_pb2.LocalRateLimit()
    public.typed_per_filter_config["rate_limit_ip"].Unpack(config)
    for bucket in (config.token_bucket, config.descriptors[0].token_bucket):
        assert bucket.max_tokens == per_minute
        assert bucket.tokens_per_fill.value == tokens_per_fill
        assert bucket.fill_interval.ToMilliseconds() == fill_ms
    # Refilling never outpaces the configured rate.
    assert tokens_per_fill * 60_000 / fill_ms <= per_minute
    assert [(h.header.key, h.header.value) for h in config.response_headers_to_add] == [
        ("retry-after", str(retry_after))
    ]
    assert config.descriptors[0].entries[0].value == ""
    assert config.max_dynamic_descriptors.value == EdgeSettings().max_rate_limit_keys
    assert config.always_consume_default_token_bucket.value is False


def test_duplicate_slugs_are_refused() -> None:
    twice = EdgeChallenge("echo", "10.0.0.5", 80, DEFAULT_LIMITS)
    with pytest.raises(ValueError, match="duplicate"):
        translate(EdgeState(EdgeSettings(), (twice, twice)))


def test_static_bootstrap_inlines_endpoints_and_routes() -> None:
    bootstrap = static_bootstrap(
        translate(CASES["several_with_hostnames"]), admin_host="127.0.0.1", admin_port=9901
    )
    assert bootstrap["admin"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 9901,
    }
    clusters = {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}
    assert {c["type"] for c in clusters.values()} == {"STATIC", "STRICT_DNS"}
    assert all("eds_cluster_config" not in c for c in clusters.values())
    mid = clusters[cluster_name("mid")]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert mid["endpoint"]["address"]["socket_address"] == {
        "address": "10.0.2.9",
        "port_value": 8002,
    }
    route_config = _route_config(bootstrap)
    assert route_config["name"] == ROUTE_CONFIG_NAME
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    assert "rds" not in hcm["typed_config"]


def test_a_new_certificate_path_changes_the_secret_and_not_the_listener() -> None:
    """Moving the certificate is an SDS update alone: the listener, whose updates drain
    Envoy's connections, stays byte-identical. Without a certificate there is no secret."""
    state = CASES["https"]
    moved = dataclasses.replace(
        state.settings, tls_cert_file="/tls/new/tls.crt", tls_key_file="/tls/new/tls.key"
    )
    before, after = translate(state), translate(dataclasses.replace(state, settings=moved))
    assert serialized(dataclasses.replace(before, secrets=())) == serialized(
        dataclasses.replace(after, secrets=())
    )
    (secret,) = after.secrets
    assert secret.tls_certificate.certificate_chain.filename == "/tls/new/tls.crt"
    assert secret.tls_certificate.private_key.filename == "/tls/new/tls.key"
    assert translate(CASES["unsigned_defaults"]).secrets == ()
